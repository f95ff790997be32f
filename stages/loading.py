"""Reading only a stage's own tensors from a checkpoint's safetensors files.

Most model tensors are stored as they are (perhaps renamed). Some are built from several stored
tensors: transformers 5 keeps a mixture of experts' weights as one 3-D parameter per layer
(`mlp.experts.gate_up_proj`) but saves them one matrix per expert, and merges them on load with
its conversion mapping (`WeightConverter` with `MergeModulelist`, `Concatenate`, ...). A stage
applies the same converters, to the stored tensors of its own blocks only.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_map(model_dir: str) -> dict[str, str]:
    """Maps every tensor name of a checkpoint to the safetensors file that holds it.

    Reads the index of a sharded checkpoint; for a single file, reads only its header.

    Args:
        model_dir: a Hugging Face checkpoint directory.

    Returns:
        tensor name -> file name (relative to `model_dir`).
    """
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(model_dir, SINGLE_FILE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"{model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    with safe_open(single, framework="pt") as f:
        return {name: SINGLE_FILE for name in f.keys()}


@dataclass(frozen=True)
class Conversion:
    """A model tensor that transformers builds from several stored tensors.

    Attributes:
        target: the model tensor's name, e.g. "model.layers.0.mlp.experts.gate_up_proj".
        converter: transformers' `WeightConverter` for it (a template: copy before use).
        sources: (source pattern, stored names) pairs; the names in the order transformers
            collects them (natural order: expert 2 before expert 10).
    """

    target: str
    converter: Any
    sources: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def keys(self) -> list[str]:
        """Every stored tensor this conversion reads."""
        return [key for _, keys in self.sources for key in keys]

    @property
    def num_slices(self) -> int | None:
        """Number of experts when the conversion can run one expert at a time, else None.

        It can when the first operation stacks each source's list along a new dim 0 and no
        later one touches dim 0: then converting expert e's tensors alone gives slice e.
        """
        from transformers.core_model_loading import MergeModulelist

        operations = self.converter.operations
        counts = {len(keys) for _, keys in self.sources}
        if not (isinstance(operations[0], MergeModulelist) and operations[0].dim == 0 and len(counts) == 1):
            return None
        if any(getattr(op, "dim", 0) == 0 for op in operations[1:]):  # no dim: assume it could
            return None
        return counts.pop()


@dataclass(frozen=True)
class CheckpointLayout:
    """Where each model tensor comes from.

    Attributes:
        names: model tensor name -> stored name, for tensors stored as they are (maybe renamed).
        conversions: model tensor name -> its `Conversion`, for tensors built from several.
    """

    names: dict[str, str]
    conversions: dict[str, Conversion]


def checkpoint_layout(model: nn.Module, files: dict[str, str]) -> CheckpointLayout:
    """Maps the model's tensor names to the checkpoint's, through transformers' own conversions.

    transformers 5 renames some checkpoint keys on load (GPT-NeoX's `embed_out` is `lm_head`,
    legacy `gamma`/`beta`, ...) and merges others (per-expert matrices); its conversion mapping
    for the model says how. This applies the same renaming rules as `from_pretrained`.

    Args:
        model: the model (on the meta device is fine).
        files: the checkpoint's weight map.

    Returns:
        The checkpoint's layout.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    meta_state = model.state_dict()
    prefix = model.base_model_prefix
    names: dict[str, str] = {}
    sources: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key in sorted(files, key=dot_natural_key):  # transformers' order, which fixes expert order
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if target not in meta_state and key in meta_state:  # as transformers: keep the stored name
            target, pattern = rename_source_key(key, [], [], prefix, meta_state)
        if pattern is None:
            names[target] = key
        else:
            sources[target][pattern].append(key)
    conversions = {}
    for target, patterns in sources.items():
        converter = by_pattern[next(iter(patterns))]
        ordered = tuple((p, tuple(patterns[p])) for p in converter.source_patterns if p in patterns)
        conversions[target] = Conversion(target, converter, ordered)
        # A split (one stored tensor, several targets) is keyed by its first target; its other
        # targets are named as transformers names them.
        first, *others = converter.target_patterns
        for other in others:
            conversions.setdefault(target.replace(first, other), conversions[target])
    return CheckpointLayout(names, conversions)


def checkpoint_names(model: nn.Module, files: dict[str, str]) -> dict[str, str]:
    """The plainly stored tensors of `checkpoint_layout`: model name -> stored name."""
    return checkpoint_layout(model, files).names


def iter_tensors(model_dir: str, names: dict[str, str], files: dict[str, str], *,
                 release_each: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields the named tensors one at a time, opening only the files that hold them.

    One at a time so that a caller can convert or quantize each and drop it before the next
    is read: a stage never holds its whole range at the checkpoint's precision.

    safetensors returns tensors that live in a private memory map of the whole file, kept until
    the file is closed and every tensor from it dropped; each page read counts in the process's
    resident memory meanwhile. With `release_each`, every tensor gets a handle of its own, so a
    tensor that the caller quantizes and drops gives its pages back before the next is read.

    Args:
        model_dir: checkpoint directory.
        names: our name -> the checkpoint's name for each tensor wanted.
        files: the checkpoint's weight map (see `weight_map`).
        release_each: open the file once per tensor instead of once per file.

    Yields:
        (our name, tensor on the CPU at the checkpoint's dtype).
    """
    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ours, theirs in names.items():
        by_file[files[theirs]].append((ours, theirs))
    for file_name in sorted(by_file):
        path = os.path.join(model_dir, file_name)
        groups = [[pair] for pair in by_file[file_name]] if release_each else [by_file[file_name]]
        for group in groups:
            with safe_open(path, framework="pt") as f:
                for ours, theirs in group:
                    yield ours, f.get_tensor(theirs)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_rows(path: str, name: str, start: int, end: int) -> torch.Tensor:
    """Rows `[start, end)` of a stored tensor, read into memory of their own.

    A plain read, not a memory map: the file's pages stay in the page cache, not in this
    process, so a caller that converts each block of rows and drops it holds one block at a time.
    """
    offset, shape, dtype = _stored(path, name)
    out = torch.empty((end - start, *shape[1:]), dtype=dtype)
    row_bytes = math.prod(shape[1:]) * out.element_size()
    with open(path, "rb") as f:
        f.seek(offset + start * row_bytes)
        f.readinto(out.view(-1).view(torch.uint8).numpy())
    return out


def _stored(path: str, name: str) -> tuple[int, list[int], torch.dtype]:
    """(file offset of the data, shape, dtype) of a tensor in a safetensors file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(header_len))[name]
    return 8 + header_len + info["data_offsets"][0], info["shape"], SAFETENSORS_DTYPES[info["dtype"]]


def load_tensors(model_dir: str, names: dict[str, str], files: dict[str, str]) -> dict[str, torch.Tensor]:
    """Loads the named tensors at once (see `iter_tensors`).

    Returns:
        our name -> tensor (on the CPU, at the checkpoint's dtype).
    """
    return dict(iter_tensors(model_dir, names, files))


def convert(conversion: Conversion, tensors: dict[str, torch.Tensor], model: nn.Module,
            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Runs transformers' converter on stored tensors, as `from_pretrained` does.

    Args:
        conversion: what to build.
        tensors: stored name -> tensor, for (a subset of) `conversion.keys`, in any order.
        model: the model the target belongs to (meta is fine; some operations read its config).
        dtype: floating tensors are cast to it first, as transformers casts on load.

    Returns:
        model tensor name -> tensor (usually just the target).
    """
    converter = copy.deepcopy(conversion.converter)  # it collects tensors: one instance per use
    for pattern, keys in conversion.sources:
        for key in keys:
            if key in tensors:
                tensor = tensors[key]
                converter.add_tensor(conversion.target, key, pattern,
                                     tensor.to(dtype) if tensor.is_floating_point() else tensor)
    return converter.convert(conversion.target, model=model, config=model.config)


def iter_converted_slices(model_dir: str, conversion: Conversion, files: dict[str, str], model: nn.Module,
                          dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields the target one expert at a time: expert e's slice from expert e's stored tensors.

    Needs `conversion.num_slices`; only one expert's tensors are in memory at once.

    Yields:
        (expert index, slice of the target with its leading dim dropped).
    """
    for index in range(conversion.num_slices):
        keys = {keys[index]: keys[index] for _, keys in conversion.sources}
        stored = load_tensors(model_dir, keys, files)
        (value,) = convert(conversion, stored, model, dtype).values()
        yield index, value[0]
