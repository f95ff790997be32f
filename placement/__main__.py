"""`python -m placement plan --model DIR --cluster FILE [...]`; see `placement.cli`."""

import sys

from placement.cli import main

sys.exit(main())
