"""Records which safetensors files and tensors a stage reads."""

from __future__ import annotations

import os

import stages.loading as loading


def record_reads(monkeypatch) -> dict[str, list[str]]:
    """Patches the loader's `safe_open`; returns file name -> tensor names read, filled as it reads."""
    opened: dict[str, list[str]] = {}
    real_safe_open = loading.safe_open

    class Recording:
        def __init__(self, path, framework):
            self.inner = real_safe_open(path, framework=framework)
            self.name = os.path.basename(path)
            opened.setdefault(self.name, [])

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, key):
            opened[self.name].append(key)
            return self.inner.get_tensor(key)

        def keys(self):
            return self.inner.keys()

    monkeypatch.setattr(loading, "safe_open", Recording)
    return opened
