"""Reading only a stage's own tensors from a checkpoint's safetensors files."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from torch import nn
from safetensors import safe_open

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


def checkpoint_names(model: nn.Module, files: dict[str, str]) -> dict[str, str]:
    """Maps the model's tensor names to the checkpoint's, through transformers' own renamings.

    transformers 5 renames some checkpoint keys on load (GPT-NeoX's `embed_out` is `lm_head`,
    legacy `gamma`/`beta`, ...); its conversion mapping for the model says how.

    Args:
        model: the model (on the meta device is fine).
        files: the checkpoint's weight map.

    Returns:
        model tensor name -> checkpoint tensor name, for every checkpoint tensor that is a plain
        (possibly renamed) copy of one model tensor.

    Raises:
        ValueError: a tensor the model needs is stored fused or split (e.g. per-expert weights of a
            mixture of experts), which needs a conversion this loader does not do.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    names, converted = {}, []
    for key in files:
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if pattern is None:
            names[target] = key
        else:
            converted.append(key)
    if converted:
        raise ValueError(f"{model.config.model_type}: checkpoint tensors such as {converted[0]!r} need a "
                         "weight conversion (fusing or splitting) that stagewise does not support yet")
    return names


def load_tensors(model_dir: str, names: dict[str, str], files: dict[str, str]) -> dict[str, torch.Tensor]:
    """Loads the named tensors, opening only the files that hold them.

    Args:
        model_dir: checkpoint directory.
        names: our name -> the checkpoint's name for each tensor wanted.
        files: the checkpoint's weight map (see `weight_map`).

    Returns:
        our name -> tensor (on the CPU, at the checkpoint's dtype).
    """
    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ours, theirs in names.items():
        by_file[files[theirs]].append((ours, theirs))
    tensors = {}
    for file_name in sorted(by_file):
        with safe_open(os.path.join(model_dir, file_name), framework="pt") as f:
            for ours, theirs in by_file[file_name]:
                tensors[ours] = f.get_tensor(theirs)
    return tensors
