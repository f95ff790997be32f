"""The compute of one contiguous block range, in plain PyTorch (no Ray, no HTTP)."""

from stages.kv_cache import KVCache, StepRows
from stages.stage import Stage, resolve_dtype

__all__ = ["KVCache", "Stage", "StepRows", "resolve_dtype"]
