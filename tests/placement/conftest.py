"""Session-wide specs of real architectures, built on the meta device from their configs.

Building even a 176B model on the meta device takes no memory, but about a second.
"""

import pytest

from placement import ModelSpec
from tests.placement.helpers import BLOOM_176B, LLAMA_2_70B, LLAMA_3_8B, MIXTRAL_8X7B


@pytest.fixture(scope="session")
def llama_2_70b() -> ModelSpec:
    return ModelSpec.from_config(LLAMA_2_70B, dtype="float16")


@pytest.fixture(scope="session")
def bloom_176b() -> ModelSpec:
    return ModelSpec.from_config(BLOOM_176B, dtype="float16")


@pytest.fixture(scope="session")
def mixtral_8x7b_nf4() -> ModelSpec:
    return ModelSpec.from_config(MIXTRAL_8X7B, dtype="float16", quantization="nf4")


@pytest.fixture(scope="session")
def llama_3_8b() -> ModelSpec:
    return ModelSpec.from_config(LLAMA_3_8B, dtype="bfloat16")
