"""Per-request LoRA adapters on a stage's blocks (vLLM-style multi-LoRA), in plain PyTorch.

A PEFT LoRA adapter adds to some linear layers `y = base(x)` a low-rank update:
`y = base(x) + scaling * B(A(x))`, with A (r, in), B (out, r) and `scaling = lora_alpha / r`
(`lora_alpha / sqrt(r)` with rsLoRA). A stage holds several adapters at once: each row of a step
names one of them or none, and every targeted layer of its blocks becomes a `LoraLinear`, which
adds each adapter's update to that adapter's tokens only. The stage reads the adapter tensors of
its own blocks only; adapters on the embeddings or the LM head are refused.

An adapter directory is what PEFT's `save_pretrained` writes: adapter_config.json and
adapter_model.safetensors, with tensors named `base_model.model.<module>.lora_A.weight` and
`...lora_B.weight`. It is read without peft, which stays a test-only dependency. The layers an
adapter targets are found as PEFT 0.21 finds them (`check_target_module_exists`): module-name
suffixes, a regex over the whole name, or "all-linear"; with `exclude_modules`,
`layers_to_transform` / `layers_pattern`, and per-layer `rank_pattern` / `alpha_pattern`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from stages.architecture import Architecture, describe
from stages.loading import load_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of the model's own module names
ALL_LINEAR = "all-linear"

# Options that change what an adapter computes and that a stage does not implement: each refused
# when set, with what it is.
REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "a bias on lora_B (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (weights stored (in, out), as GPT-2's Conv1D)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)", "layer_replication": "layer_replication",
    "use_qalora": "QALoRA (use_qalora)", "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)", "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)", "monteclora_config": "MonteCLoRA (monteclora_config)",
}


@dataclass(frozen=True)
class Target:
    """One layer an adapter changes.

    Attributes:
        rank: r of this layer (`rank_pattern`, else the config's `r`).
        scaling: the factor of its update.
    """

    rank: int
    scaling: float


def read_config(name: str, adapter_dir: str) -> dict:
    """An adapter's adapter_config.json, checked for options a stage can compute.

    Raises:
        ValueError: the directory is not a PEFT LoRA adapter, or it uses an option refused here.
    """
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise ValueError(f"LoRA adapter {name!r}: {adapter_dir} has no {ADAPTER_CONFIG}")
    with open(path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: {adapter_dir} is a {config['peft_type']} adapter, not LORA")
    refused = [what for key, what in REFUSED_OPTIONS.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append(f"trained biases (bias={config['bias']!r})")
    if refused:
        raise ValueError(f"LoRA adapter {name!r}: not supported: {', '.join(refused)}")
    if not config.get("target_modules"):
        raise ValueError(f"LoRA adapter {name!r}: the config names no target_modules")
    return config


def _layer_index(config: dict, key: str) -> int | None:
    """The block index in a module name, found as PEFT finds it for `layers_to_transform`."""
    patterns = config.get("layers_pattern")
    if not patterns:
        # Lazy: the first numbered segment is the block, not an expert inside it.
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match["idx"]) if match else None


def is_targeted(config: dict, targets: str | set[str], key: str) -> bool:
    """Whether an adapter targets the module named `key`: PEFT's `check_target_module_exists`.

    Args:
        config: the adapter's config.
        targets: a regex over the whole name, or names and name suffixes (`target_modules`,
            with "all-linear" already replaced by the layers' names).
        key: a module name of the model, e.g. "model.layers.0.self_attn.q_proj".
    """
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, key):
        return False
    if exclude and not isinstance(exclude, str) and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{target}") for target in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(config, key)
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's `get_pattern_key`: the value of the first pattern that ends `key`, else `default`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _stored_shapes(name: str, adapter_dir: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """module name -> {"lora_A": shape, "lora_B": shape} from the weights file's header."""
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(path):
        found = " (adapter_model.bin: convert it to safetensors)" if os.path.exists(
            os.path.join(adapter_dir, "adapter_model.bin")) else ""
        raise ValueError(f"LoRA adapter {name!r}: {adapter_dir} has no {ADAPTER_WEIGHTS}{found}")
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_B)\.weight", key)
            if match is None:
                raise ValueError(f"LoRA adapter {name!r}: tensor {key} is not a LoRA weight of a linear layer")
            shapes.setdefault(match[1], {})[match[2]] = tuple(f.get_slice(key).get_shape())
    return shapes


def plan_adapter(name: str, adapter_dir: str, model: nn.Module, arch: Architecture) -> dict[str, Target]:
    """Checks an adapter against a model's module tree (the meta device's will do).

    Args:
        name: the adapter's name, for messages.
        adapter_dir: a PEFT LoRA adapter directory.
        model: the whole base model, its layers not yet replaced (`stages.stage.meta_model`).
        arch: its `Architecture`.

    Returns:
        module name -> `Target`, for every layer the adapter changes.

    Raises:
        ValueError: naming the adapter, when it cannot be served on this model: a refused option, a
            target module the model lacks or that is not a linear layer of its blocks, a missing
            lora_A/lora_B, or a shape that does not fit the layer or the rank.
    """
    config = read_config(name, adapter_dir)
    modules = dict(model.named_modules())
    targets = config["target_modules"]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = {key for key, module in modules.items() if isinstance(module, nn.Linear) and key != arch.head}
    elif isinstance(targets, str):
        if not any(key and re.fullmatch(targets, key) for key in modules):
            raise ValueError(f"LoRA adapter {name!r}: target_modules {targets!r} matches no module of the base model")
    else:
        targets = set(targets)
        for target in sorted(targets):
            if not any(key == target or key.endswith(f".{target}") for key in modules):
                raise ValueError(f"LoRA adapter {name!r}: target module {target!r} is not a module of the base "
                                 f"model ({arch.model_type})")
    chosen = [key for key in modules if key and is_targeted(config, targets, key)]
    if not chosen:
        raise ValueError(f"LoRA adapter {name!r}: its target_modules select no module of the base model")
    stored = _stored_shapes(name, adapter_dir)
    plan = {}
    for key in chosen:
        if not key.startswith(f"{arch.layers}."):
            raise ValueError(f"LoRA adapter {name!r}: targets {key}, outside the blocks: LoRA on the embeddings "
                             f"or the LM head is not supported")
        if not isinstance(modules[key], nn.Linear):
            raise ValueError(f"LoRA adapter {name!r}: targets {key}, a {type(modules[key]).__name__}: only "
                             f"linear layers are supported")
        plan[key] = _target(name, config, key, modules[key], stored.pop(key, {}))
    if stored:
        raise ValueError(f"LoRA adapter {name!r}: holds weights for {sorted(stored)[0]}, which its config does "
                         f"not target")
    return plan


def _target(name: str, config: dict, key: str, layer: nn.Linear, shapes: dict[str, tuple[int, ...]]) -> Target:
    """One targeted layer's rank and scaling, its stored shapes checked."""
    missing = [part for part in ("lora_A", "lora_B") if part not in shapes]
    if missing:
        raise ValueError(f"LoRA adapter {name!r}: {key} has no {' or '.join(missing)} weight")
    rank = int(_pattern_value(config.get("rank_pattern") or {}, key, config["r"]))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, key, config.get("lora_alpha", 8))
    a, b = shapes["lora_A"], shapes["lora_B"]
    if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
        raise ValueError(f"LoRA adapter {name!r}: {key} has lora_A {a} and lora_B {b}, which do not fit its "
                         f"rank r={rank}")
    if a[1] != layer.in_features or b[0] != layer.out_features:
        raise ValueError(f"LoRA adapter {name!r}: {key} has lora_A {a} and lora_B {b}, but the base layer maps "
                         f"{layer.in_features} features to {layer.out_features}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return Target(rank, scaling)


def check_adapter(model_dir: str, adapter_dir: str, name: str | None = None) -> dict[str, Target]:
    """Checks that an adapter can be served on a checkpoint, without loading either's weights.

    Reads the checkpoint's config.json and the adapter's config and safetensors header.

    Args:
        model_dir: the base checkpoint directory.
        adapter_dir: a PEFT LoRA adapter directory.
        name: the adapter's name in messages (default: `adapter_dir`).

    Returns:
        module name -> `Target`, for every layer the adapter changes.

    Raises:
        ValueError: as `plan_adapter`.
    """
    from transformers import AutoConfig

    from stages.stage import meta_model  # stages.stage imports this module

    model = meta_model(AutoConfig.from_pretrained(model_dir), torch.float32)
    return plan_adapter(adapter_dir if name is None else name, adapter_dir, model, describe(model))


class AdapterSelection:
    """Which tokens of the current step each adapter applies to; shared by a stage's `LoraLinear`s.

    Args:
        num_adapters: the stage's adapters; indices 1..num_adapters name them, 0 none.
    """

    def __init__(self, num_adapters: int):
        self.num_adapters = num_adapters
        # (adapter index, indices into the step's flattened tokens, or None for all of them)
        self.groups: list[tuple[int, torch.Tensor | None]] = []

    def begin_step(self, adapters: list[int] | None, num_new: list[int], width: int, packed: bool,
                   device: torch.device) -> None:
        """Sets the adapter of each row for the next forward.

        Args:
            adapters: per row, 0 for the base model or i for the i-th adapter; None: all 0.
            num_new: real new tokens of each row.
            width: tokens per row of the step's inputs (padded) or all of them (packed).
            packed: the rows' tokens come one after another in one row (`stages.stage.is_packed`).
            device: where the step's hidden states are.

        Raises:
            ValueError: not one index per row, or an index that names no adapter of the stage.
        """
        self.groups = []
        if adapters is None:
            return
        adapters = [int(a) for a in adapters]
        if len(adapters) != len(num_new):
            raise ValueError(f"{len(adapters)} adapter indices for a step of {len(num_new)} rows")
        for row, index in enumerate(adapters):
            if not 0 <= index <= self.num_adapters:
                raise ValueError(f"adapter index {index} of row {row} names none of the stage's "
                                 f"{self.num_adapters} LoRA adapters (0 is the base model)")
        if set(adapters) == {0}:
            return
        if len(set(adapters)) == 1:  # one adapter for the whole step: no gathering (padding too)
            self.groups = [(adapters[0], None)]
            return
        # Where each row's tokens start among the step's flattened (B * T) or packed (N) tokens.
        if packed:
            firsts = list(itertools.accumulate(num_new[:-1], initial=0))
        else:
            firsts = [row * width for row in range(len(num_new))]
        for index in sorted(set(adapters) - {0}):
            tokens = [torch.arange(firsts[row], firsts[row] + num_new[row])
                      for row, a in enumerate(adapters) if a == index]
            self.groups.append((index, torch.cat(tokens).to(device)))


class LoraLinear(nn.Module):
    """A linear layer (`nn.Linear` or `PackedLinear`) plus the updates of the adapters targeting it.

    Args:
        base: the layer.
        selection: the stage's `AdapterSelection`, set once per step.
        weights: adapter index -> (lora_A (r, in), lora_B (out, r), scaling), for the adapters
            that target this layer.
    """

    def __init__(self, base: nn.Module, selection: AdapterSelection,
                 weights: dict[int, tuple[torch.Tensor, torch.Tensor, float]]):
        super().__init__()
        self.base, self.selection = base, selection
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = {index: scaling for index, (_, _, scaling) in weights.items()}
        for index, (a, b, _) in weights.items():
            self.register_buffer(f"lora_A_{index}", a)
            self.register_buffer(f"lora_B_{index}", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for index, tokens in self.selection.groups:
            if index not in self.scaling:
                continue
            a, b = getattr(self, f"lora_A_{index}"), getattr(self, f"lora_B_{index}")
            if tokens is None:
                out += F.linear(F.linear(x, a), b) * self.scaling[index]
                continue
            flat = x.reshape(-1, x.shape[-1]).index_select(0, tokens)  # (tokens, in)
            update = F.linear(F.linear(flat, a), b) * self.scaling[index]  # (tokens, out)
            out.view(-1, out.shape[-1]).index_add_(0, tokens, update)
        return out

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.scaling)}"


class StageAdapters:
    """A stage's LoRA adapters: each checked against the whole model, loaded for the stage's blocks.

    Args:
        lora_modules: adapter name -> directory; the i-th (from 1, in order) is adapter index i.
        model: the whole base model on the meta device, its layers not yet replaced.
        arch: its `Architecture`.
        start: the stage's first block.
        end: one past its last block.
    """

    def __init__(self, lora_modules: dict[str, str], model: nn.Module, arch: Architecture, start: int, end: int):
        self.names = tuple(lora_modules)
        self.dirs = tuple(lora_modules.values())
        own = tuple(f"{arch.layers}.{i}." for i in range(start, end))
        self.plans = [{key: target for key, target in plan_adapter(name, path, model, arch).items()
                       if key.startswith(own)} for name, path in lora_modules.items()]
        self.selection = AdapterSelection(len(self.names))

    def attach(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Replaces each of the stage's targeted layers (their weights loaded) by a `LoraLinear`,
        reading only those layers' adapter tensors."""
        weights: dict[str, dict[int, tuple]] = {}
        for index, (adapter_dir, plan) in enumerate(zip(self.dirs, self.plans), start=1):
            names = {f"{PREFIX}{key}.{part}.weight": f"{PREFIX}{key}.{part}.weight"
                     for key in plan for part in ("lora_A", "lora_B")}
            tensors = load_tensors(adapter_dir, names, dict.fromkeys(names, ADAPTER_WEIGHTS)) if names else {}
            for key, target in plan.items():
                a, b = (tensors[f"{PREFIX}{key}.{part}.weight"].to(dtype) for part in ("lora_A", "lora_B"))
                weights.setdefault(key, {})[index] = (a, b, target.scaling)
        for key, by_index in weights.items():
            model.set_submodule(key, LoraLinear(model.get_submodule(key), self.selection, by_index))
