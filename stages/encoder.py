"""One contiguous layer range of a BERT-family sentence encoder, loaded on its own.

An encoder stage is a decoder `Stage` without a KV cache: the first holds the embeddings, each
holds the encoder layers `[start, end)`, and the last pools the hidden states into one embedding
per text (mean over the real tokens, or the [CLS] token) and, if the checkpoint asks, normalises it.
The module tree is built on the meta device and only the stage's own tensors are read from the
checkpoint, one at a time, as `stages.stage` does.

Pooling and normalisation are sentence-transformers modules, not part of the transformers model:
they are read from its metadata (`modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`) when the checkpoint has it, with plain defaults when it does not.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.masking_utils import create_bidirectional_mask

from stages.loading import checkpoint_layout, iter_tensors, weight_map
from stages.stage import resolve_dtype

# Encoder model types served; each must have BertModel's layout (embeddings, encoder.layer).
ENCODER_MODEL_TYPES = ("bert",)
# Attention for the layers. PyTorch's SDPA: the layers take whatever mask transformers builds
# for it, so the stage asks transformers for the mask instead of knowing its format.
ATTENTION = "sdpa"
# sentence-transformers' pooling flags, by the name we give the mode.
POOLING_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens"}


@dataclass(frozen=True)
class EncoderConfig:
    """What a sentence encoder does beyond its transformers config.

    Attributes:
        pooling: "mean" (over the tokens the attention mask keeps) or "cls" (the first token).
        normalize: L2-normalise the pooled embedding (a `Normalize` module in modules.json).
        max_seq_length: longest input, in tokens, the model is meant to see.
        hidden_size: width of the hidden states and of the embedding.
        num_layers: encoder layers in the checkpoint.
    """

    pooling: str
    normalize: bool
    max_seq_length: int
    hidden_size: int
    num_layers: int


def is_encoder(config) -> bool:
    """Whether a checkpoint's config is a sentence encoder this module serves.

    A BERT-family model (`model_type` in `ENCODER_MODEL_TYPES`) that is not set up as a decoder:
    `is_decoder` (BertLMHeadModel) or a causal-LM architecture means it generates text, and
    belongs to `stages.stage`. A masked-LM or BertModel checkpoint is served by its encoder.

    Args:
        config: a transformers config (`AutoConfig.from_pretrained(model_dir)`).
    """
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return False
    return config.model_type in ENCODER_MODEL_TYPES


def _read_json(path: str) -> dict | list | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_encoder_config(model_dir: str) -> EncoderConfig:
    """Reads how a checkpoint pools and normalises, from its sentence-transformers metadata.

    Without modules.json (a plain BertModel directory) the defaults are those of
    sentence-transformers for a bare transformers model: mean pooling, no normalisation, and
    inputs as long as the position table allows.

    Args:
        model_dir: checkpoint directory (config.json, safetensors, maybe sentence-transformers files).

    Returns:
        Its `EncoderConfig`.

    Raises:
        ValueError: the metadata asks for what a stage does not do (max pooling, several modes,
            a transformer in a subfolder).
    """
    config = AutoConfig.from_pretrained(model_dir)
    modules = _read_json(os.path.join(model_dir, "modules.json")) or []
    by_type = {m["type"].rpartition(".")[2]: m for m in modules}
    if by_type.get("Transformer", {}).get("path", "") not in ("", "."):
        raise ValueError(f"{model_dir}: the transformer is in {by_type['Transformer']['path']!r}; "
                         "stages read it from the directory itself")
    pooling = "mean"
    if "Pooling" in by_type:
        flags = _read_json(os.path.join(model_dir, by_type["Pooling"]["path"], "config.json")) or {}
        modes = sorted(k for k, v in flags.items() if k.startswith("pooling_mode") and v is True)
        known = {flag: name for name, flag in POOLING_FLAGS.items()}
        if len(modes) != 1 or modes[0] not in known:
            raise ValueError(f"{model_dir}: pooling {modes} is not supported (one of {sorted(POOLING_FLAGS)})")
        pooling = known[modes[0]]
    sbert = _read_json(os.path.join(model_dir, "sentence_bert_config.json")) or {}
    max_seq_length = min(sbert.get("max_seq_length") or config.max_position_embeddings,
                         config.max_position_embeddings)
    return EncoderConfig(pooling=pooling, normalize="Normalize" in by_type, max_seq_length=max_seq_length,
                         hidden_size=config.hidden_size, num_layers=config.num_hidden_layers)


def meta_encoder(config, dtype: torch.dtype) -> nn.Module:
    """The whole encoder's module tree on the meta device, in eval mode.

    Buffers stay real (include_buffers=False): the embeddings' position and token-type ids are
    made in __init__ and are not read from checkpoints.
    """
    with init_empty_weights():
        model = AutoModel.from_config(config, attn_implementation=ATTENTION, dtype=dtype)
    return model.eval()


def owned_modules(start: int, end: int) -> list[str]:
    """The modules of the stage of layers `[start, end)`: its layers, and the embeddings on the first."""
    return [f"encoder.layer.{i}" for i in range(start, end)] + (["embeddings"] if start == 0 else [])


def read_plan(model_dir: str, model: nn.Module, owned: list[str], files: dict[str, str]) -> dict[str, str]:
    """Our name -> the checkpoint's name of every tensor of the `owned` modules.

    Raises:
        ValueError: the checkpoint lacks one.
    """
    # transformers' renaming rules: adds or strips the `bert.` prefix, legacy gamma/beta, ...
    layout = checkpoint_layout(model, files)
    wanted = {}
    for prefix in owned:
        for local in model.get_submodule(prefix).state_dict():  # persistent tensors only
            name = f"{prefix}.{local}"
            if name not in layout.names:
                raise ValueError(f"{model_dir}: tensor {name} is missing from the checkpoint")
            wanted[name] = layout.names[name]
    return wanted


def stored_tensors(model_dir: str, start: int, end: int) -> set[str]:
    """The checkpoint's names of the tensors the stage of layers `[start, end)` reads (what a node
    without the checkpoint fetches; see `app.weights`)."""
    model = meta_encoder(AutoConfig.from_pretrained(model_dir), torch.float32)
    return set(read_plan(model_dir, model, owned_modules(start, end), weight_map(model_dir)).values())


class EncoderStage(nn.Module):
    """The encoder layers `[start, end)` of a checkpoint; embeddings on the first, pooling on the last.

    Args:
        model_dir: a Hugging Face checkpoint directory of a BERT-family encoder.
        start: first layer (0-based).
        end: one past the last layer; `end == num_hidden_layers` makes this the last stage.
        dtype: compute and storage dtype ("float32", "float16", "bfloat16").
        device: where the weights live.
    """

    def __init__(self, model_dir: str, start: int, end: int, *, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.encoder_config = read_encoder_config(model_dir)
        self.num_layers = self.encoder_config.num_layers
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is not within [0, {self.num_layers})")
        self.start, self.end = start, end
        self.is_first, self.is_last = start == 0, end == self.num_layers
        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)

        model = meta_encoder(AutoConfig.from_pretrained(model_dir), self.dtype)
        self.config = model.config  # carries the attention implementation the mask is built for
        self._load(model_dir, model, owned_modules(start, end))
        self.embeddings = model.embeddings if self.is_first else None
        self.layers = nn.ModuleList(model.encoder.layer[i] for i in range(start, end))
        del model  # the other stages' layers and the (unused) pooler stay behind, on meta
        self.to(self.device)
        self.eval()

    def _load(self, model_dir: str, model: nn.Module, owned: list[str]) -> None:
        """Reads the `owned` modules' tensors, one at a time, each cast as it is placed."""
        files = weight_map(model_dir)
        for name, tensor in iter_tensors(model_dir, read_plan(model_dir, model, owned, files), files):
            value = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
            set_module_tensor_to_device(model, name, self.device, value=value)

    # What a pipeline of stages asks of every stage (`app.stage_server`): no KV cache, no quantization.
    is_encoder, cache, quantization = True, None, None

    def rows(self, tables: list[list[int]], starts: list[int], num_new: list[int], width: int,
             packed: bool) -> torch.Tensor:
        """Checks a step's rows before anything is computed: whole texts from position 0, right-padded
        to `width` (an encoder sees every token of a text at once, so it is never split or packed).

        Returns:
            The step's attention mask (B, width).

        Raises:
            ValueError: the rows are not whole, padded texts of at most `max_seq_length` tokens.
        """
        if packed or any(starts) or any(tables) or width > self.encoder_config.max_seq_length or \
                any(n > width for n in num_new):
            raise ValueError(f"an encoder step is whole texts from position 0, padded, of at most "
                             f"{self.encoder_config.max_seq_length} tokens, without KV cache blocks")
        return (torch.arange(width) < torch.tensor(num_new).unsqueeze(1)).long()

    def warm_up(self, step_tokens: int, max_rows: int) -> None:
        """Runs the largest steps this stage is sent (`max_rows` texts within `step_tokens`, and
        one text of `max_seq_length`), so that their working memory is taken at start."""
        longest = self.encoder_config.max_seq_length
        for rows, width in ((max_rows, max(1, min(longest, step_tokens // max_rows))), (1, longest)):
            inputs = (torch.zeros(rows, width, dtype=torch.long) if self.is_first else
                      torch.zeros(rows, width, self.encoder_config.hidden_size, dtype=self.dtype))
            self(inputs, torch.ones(rows, width, dtype=torch.long))

    def weight_bytes(self) -> int:
        """Bytes of the parameters and buffers this stage holds, each tensor once."""
        tensors = {id(t): t for t in [*self.parameters(), *self.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Runs a batch through the stage's layers.

        Args:
            inputs: token ids (B, T) int64 on the first stage, hidden states (B, T, H) on the
                others; rows right-padded to the longest. Token types are all 0 (one text per
                row), as a tokenizer gives for single texts.
            attention_mask: (B, T), 1 for real tokens and 0 for padding; every stage needs it.

        Returns:
            hidden states (B, T, H) at the stage's dtype; on the last stage the float32
            embeddings (B, H), normalised if the checkpoint says so.

        Raises:
            ValueError: the first stage got more tokens than `max_seq_length` (truncating is the
                tokenizer's job; a stage never cuts a text silently).
        """
        inputs, attention_mask = inputs.to(self.device), attention_mask.to(self.device)
        if self.is_first:
            if inputs.shape[1] > self.encoder_config.max_seq_length:
                raise ValueError(f"{inputs.shape[1]} tokens is over max_seq_length "
                                 f"{self.encoder_config.max_seq_length}")
            hidden = self.embeddings(input_ids=inputs)  # (B, T, H); positions 0..T-1, right padding
        else:
            hidden = inputs.to(self.dtype)
        # The mask in the format the configured attention takes (None when nothing is padded).
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out
        if not self.is_last:
            return hidden
        return self.pool(hidden, attention_mask)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One float32 embedding (B, H) per row, as sentence-transformers' Pooling and Normalize."""
        hidden = hidden.float()
        if self.encoder_config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if self.encoder_config.normalize else pooled
