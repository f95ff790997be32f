"""Where the parts of a transformers causal LM live, found generically with small adapters.

A decoder-only `AutoModelForCausalLM` is: token embeddings (+ learned positions for some), a list
of blocks, a final norm and an LM head; rotary models also hold one rotary module at the base.
This module names those parts by their qualified module names so that a stage can take only its
own, and says which attention pattern (causal or sliding window) each block uses.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

# Names transformers uses for the norm after the last block.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")
# Learned absolute position embeddings, added to the token embeddings at stage 0.
POSITION_EMBEDDING_NAMES = ("wpe", "embed_positions", "position_embeddings")


@dataclass(frozen=True)
class Architecture:
    """Qualified module names of the parts of one model.

    Attributes:
        model_type: the config's `model_type`.
        layers: name of the `ModuleList` of blocks, e.g. "model.layers".
        embed: the token embedding, e.g. "model.embed_tokens".
        position_embed: learned position embedding ("transformer.wpe"), or None.
        final_norm: the norm after the last block, or None.
        head: the LM head, e.g. "lm_head".
        rotary: the base model's rotary module, or None.
        sliding: per block, the sliding-window size it attends within, or None for full causal.
        tied: the head shares the embedding's weight.
        cache_arg: the keyword a block's `forward` takes its KV cache by, read from its
            signature (see `CACHE_ARGS`).
    """

    model_type: str
    layers: str
    embed: str
    position_embed: str | None
    final_norm: str | None
    head: str
    rotary: str | None
    sliding: tuple[int | None, ...]
    tied: bool
    cache_arg: str


def _qualified_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not part of the model")


def _sliding_windows(config, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types[:num_layers])
    if window and getattr(config, "use_sliding_window", True):
        return (window,) * num_layers
    return (None,) * num_layers


# The keyword a decoder block takes its KV cache by, newest name first. Seen: transformers
# 5.23 says "past_key_values" (GPT-NeoX, BLOOM, Falcon: "layer_past"); 5.24 renamed it "cache" for
# most models (Llama, GPT-2, Qwen2/3, Mistral, Phi-3, Gemma 1/2, OPT, Mixtral, Qwen2-MoE) and keeps
# the old name as a deprecated alias; "past_key_value" is 4.x's.
CACHE_ARGS = ("cache", "past_key_values", "layer_past", "past_key_value")


def _cache_arg(block: nn.Module) -> str:
    # inspect follows the __wrapped__ of transformers' deprecate_kwarg, so this is the real name.
    params = inspect.signature(block.forward).parameters
    for name in CACHE_ARGS:
        if name in params:
            return name
    raise ValueError(f"{type(block).__name__}.forward takes no KV cache argument "
                     f"(looked for {', '.join(CACHE_ARGS)}; transformers may have renamed it again)")


def _is_tied(model: nn.Module, head_name: str) -> bool:
    """Whether the head's weight is the embedding's (stored once in checkpoints)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    # transformers 5 ties at load time; on the meta device only its declared mapping tells.
    tied_keys = getattr(model, "_tied_weights_keys", None) or {}
    return f"{head_name}.weight" in tied_keys or model.get_output_embeddings().weight is model.get_input_embeddings().weight


def describe(model: nn.Module) -> Architecture:
    """Finds the parts of a causal LM (on any device, the meta device included).

    Args:
        model: an `AutoModelForCausalLM` instance.

    Returns:
        Its `Architecture`.

    Raises:
        ValueError: the model does not have the shape of a decoder-only LM.
    """
    config = model.config
    num_layers = config.num_hidden_layers
    base = model.base_model
    base_name = _qualified_name(model, base)
    prefix = f"{base_name}." if base_name else ""

    layer_lists = [(name, m) for name, m in base.named_children()
                   if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(layer_lists) != 1:
        raise ValueError(f"{config.model_type}: cannot find the list of {num_layers} blocks")
    children = dict(base.named_children())
    final_norm = next((n for n in FINAL_NORM_NAMES if n in children), None)
    position_embed = next((n for n in POSITION_EMBEDDING_NAMES if isinstance(children.get(n), nn.Embedding)), None)
    rotary = next((n for n, m in children.items() if type(m).__name__.endswith("RotaryEmbedding")), None)

    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{config.model_type}: the model has no LM head")
    return Architecture(
        model_type=config.model_type,
        layers=prefix + layer_lists[0][0],
        embed=_qualified_name(model, embed),
        position_embed=prefix + position_embed if position_embed else None,
        final_norm=prefix + final_norm if final_norm else None,
        head=_qualified_name(model, head),
        rotary=prefix + rotary if rotary else None,
        sliding=_sliding_windows(config, num_layers),
        tied=_is_tied(model, head_name=_qualified_name(model, head)),
        cache_arg=_cache_arg(layer_lists[0][1][0]),
    )
