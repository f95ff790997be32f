"""Counting a model's elements from its config alone, on the meta device.

`count_tallies` is the one function of `placement` that imports torch and transformers: it builds
the `AutoModelForCausalLM` for a config (an encoder's `AutoModel`, see `stages.encoder`) on the
meta device (no memory, no weights read) and sorts every parameter and persistent buffer into a
block, the embeddings or the head. Persistent
buffers count because a stage loads them from the checkpoint; non-persistent ones (rotary
frequencies) are recomputed and tiny.
"""

from __future__ import annotations

from typing import Any, Mapping

from placement.model_spec import NF4_BLOCKSIZE, ModelTallies, PartTally

# Attention layer types that keep a KV cache; others (linear attention, mamba, conv) keep a
# fixed-size state instead, which is not per token.
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "attention")


def count_tallies(config: Any) -> ModelTallies:
    """Element counts per block, embeddings and head, from a model config.

    Args:
        config: a `config.json` as a dict (with `model_type`) or a transformers config object.

    Returns:
        The model's tallies; see `ModelTallies`.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from stages.encoder import is_encoder

    config = _as_config(config)
    encoder = is_encoder(config)  # no KV cache; its pooler is not served (stages pool themselves)
    with torch.device("meta"):
        model = (AutoModel if encoder else AutoModelForCausalLM).from_config(config)
    text_config = config.get_text_config()
    blocks_name, num_layers = _find_blocks(model, getattr(text_config, "num_hidden_layers", None))
    linear_types = (torch.nn.Linear,)
    embedding_types = (torch.nn.Embedding,)

    counts: dict[Any, dict[str, int]] = {}  # part -> PartTally fields; part = block index or name
    owners: dict[int, Any] = {}  # id(tensor) -> the part that first held it
    tied_numel = 0
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, tensor, is_param in _named_tensors(model, modules):
        if encoder and name.startswith("pooler."):
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        part = _part_of(name, owner_name, owner, blocks_name, embedding_types)
        if _seen(counts, part, id(tensor)):
            continue  # the same tensor twice in one part is held once
        first_part = owners.setdefault(id(tensor), part)
        if {first_part, part} == {"embed", "head"}:
            tied_numel += tensor.numel()  # the head stage holds its own copy
        in_block = isinstance(part, int)
        matrix = in_block and is_param and _is_weight_matrix(owner, leaf, tensor, linear_types)
        _add(counts, part, tensor, is_param, matrix, _rows(owner, tensor, linear_types))

    return ModelTallies(
        blocks=tuple(_tally(counts.get(i, {})) for i in range(num_layers)),
        embed=_tally(counts.get("embed", {})),
        head=_tally(counts.get("head", {})),
        tied_numel=tied_numel,
        kv_numel_per_token=(0,) * num_layers if encoder else _kv_numel_per_token(text_config, num_layers),
        model_type=str(getattr(config, "model_type", "")),
        act_numel_per_token=_act_numel_per_token(model, blocks_name, num_layers, text_config),
        vocab_size=_first_int(text_config, "vocab_size") or 0,
    )


def _act_numel_per_token(model: Any, blocks_name: str, num_layers: int, config: Any) -> tuple[int, ...]:
    """Activation elements per token of a step in each block: every projection's output (q, k,
    v, o, gate, up, down; a fused one counted once), and the hidden state three times (the
    input, the residual and the output). An upper bound on what is alive at once."""
    hidden = _first_int(config, "hidden_size", "n_embd", "d_model") or 0
    blocks = model.get_submodule(blocks_name) if blocks_name else None
    out = []
    for index in range(num_layers):
        widths = 0
        if blocks is not None:
            for module in blocks[index].modules():
                weight = getattr(module, "weight", None)
                if getattr(weight, "ndim", 0) == 2 and type(module).__name__ in ("Linear", "Conv1D"):
                    widths += weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0]
        out.append(widths + 3 * hidden)
    return tuple(out)


def _as_config(config: Any) -> Any:
    if not isinstance(config, Mapping):
        return config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config.json has no model_type transformers knows: {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(dict(config))


def _find_blocks(model: Any, num_hidden_layers: int | None) -> tuple[str, int]:
    """The qualified name and length of the module list holding the decoder blocks.

    The blocks are the `ModuleList` whose length is the config's `num_hidden_layers`; when
    several match (or none), the one with the most parameters wins.
    """
    candidates = []
    for name, module in model.named_modules():
        if type(module).__name__ == "ModuleList" and len(module) > 0:
            numel = sum(p.numel() for p in module.parameters())
            candidates.append((len(module) == num_hidden_layers, numel, name, len(module)))
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no list of blocks")
    _, _, name, length = max(candidates, key=lambda c: (c[0], c[1]))
    return name, length


def _named_tensors(model: Any, modules: Mapping[str, Any]):
    """Yields (name, tensor, is_parameter) for parameters and persistent buffers, ties kept."""
    for name, param in model.named_parameters(remove_duplicate=False):
        yield name, param, True
    for name, buffer in model.named_buffers(remove_duplicate=False):
        owner_name, _, leaf = name.rpartition(".")
        if leaf not in modules[owner_name]._non_persistent_buffers_set:
            yield name, buffer, False


def _part_of(name: str, owner_name: str, owner: Any, blocks_name: str, embedding_types) -> Any:
    """Block index for tensors in the blocks, else "embed" (stage 0) or "head" (last stage).

    Embedding modules and modules named after embeddings (BLOOM's embedding layer norm, OPT's
    `project_in`) go with the embeddings; everything else outside the blocks (final norm,
    LM head, OPT's `project_out`) goes with the head.
    """
    prefix = f"{blocks_name}." if blocks_name else ""
    if name.startswith(prefix):
        return int(name[len(prefix) :].split(".", 1)[0])
    lowered = owner_name.lower()
    if isinstance(owner, embedding_types) or "embed" in lowered or "project_in" in lowered:
        return "embed"
    return "head"


def _is_weight_matrix(owner: Any, leaf: str, tensor: Any, linear_types) -> bool:
    """Whether int8/nf4 would shrink this parameter: linear/Conv1D weights, 3-D expert weights."""
    if tensor.ndim >= 3:
        return True
    is_linear = isinstance(owner, linear_types) or type(owner).__name__ == "Conv1D"
    return is_linear and leaf == "weight" and tensor.ndim == 2


def _rows(owner: Any, tensor: Any, linear_types) -> int:
    """Output rows of a weight matrix: Conv1D stores (in, out), the others (…, out, in)."""
    if tensor.ndim < 2:
        return 0
    if type(owner).__name__ == "Conv1D" and not isinstance(owner, linear_types):
        return tensor.shape[-1]
    return tensor.numel() // tensor.shape[-1]


def _seen(counts: dict, part: Any, tensor_id: int) -> bool:
    ids = counts.setdefault(part, {}).setdefault("_ids", set())
    if tensor_id in ids:
        return True
    ids.add(tensor_id)
    return False


def _add(counts: dict, part: Any, tensor: Any, is_param: bool, matrix: bool, rows: int) -> None:
    entry = counts.setdefault(part, {})
    numel = tensor.numel()
    if is_param:
        entry["params"] = entry.get("params", 0) + numel
    if matrix:
        entry["matrix_numel"] = entry.get("matrix_numel", 0) + numel
        entry["matrix_rows"] = entry.get("matrix_rows", 0) + rows
        groups = -(-numel // NF4_BLOCKSIZE)
        entry["matrix_groups"] = entry.get("matrix_groups", 0) + groups
        entry["matrix_count"] = entry.get("matrix_count", 0) + 1
    elif tensor.is_floating_point():
        entry["float_numel"] = entry.get("float_numel", 0) + numel
    else:
        entry["fixed_bytes"] = entry.get("fixed_bytes", 0) + numel * tensor.element_size()


def _tally(entry: Mapping[str, Any]) -> PartTally:
    return PartTally(**{k: v for k, v in entry.items() if not k.startswith("_")})


def _kv_numel_per_token(config: Any, num_layers: int) -> tuple[int, ...]:
    """K and V elements per cached token for each block: 2 * kv_heads * head_dim."""
    heads = _first_int(config, "num_attention_heads", "n_head", "num_heads") or 1
    kv_heads = _first_int(config, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv_heads is None:
        kv_heads = 1 if getattr(config, "multi_query", False) else heads
    head_dim = _first_int(config, "head_dim")
    if head_dim is None:
        hidden = _first_int(config, "hidden_size", "n_embd", "d_model") or 0
        head_dim = hidden // heads
    per_block = 2 * kv_heads * head_dim
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(layer_types, (list, tuple)) or len(layer_types) != num_layers:
        return (per_block,) * num_layers
    return tuple(per_block if t in _ATTENTION_LAYER_TYPES else 0 for t in layer_types)


def _first_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
