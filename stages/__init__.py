"""The compute of one contiguous block range, in plain PyTorch (no Ray, no HTTP)."""

from stages.kv_cache import PagedKVCache, PagedRows
from stages.stage import Stage, resolve_dtype

__all__ = ["PagedKVCache", "PagedRows", "Stage", "resolve_dtype"]
