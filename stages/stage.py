"""One contiguous block range of a transformers causal LM, loaded on its own.

A `Stage` builds the whole model's module tree on the meta device (no memory), keeps the blocks
`[start, end)` (plus the embeddings on stage 0, the final norm and LM head on the last stage),
and fills only those from the checkpoint, one tensor at a time. Its forward runs transformers' own
block modules over a batch of rows of different lengths, against its KV cache: a pool of blocks
allocated once (`stages.kv_cache`).

With `quantization="int8"` or `"nf4"` the weight matrices of its blocks are quantized with
bitsandbytes as each is read (see `stages.quantize`), never the whole range in float first.
On the CPU, the float32 and bfloat16 linear layers of an unquantized stage are laid out for
oneDNN as each is read (see `stages.packed`): the same arithmetic, in much less time for the few
rows of a decode step. LoRA adapters (`stages.lora`) add their updates to the rows that ask for one.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from stages.architecture import Architecture, describe
from stages.kv_cache import ATTENTION, PagedKVCache, PagedRows
from stages.loading import (Conversion, checkpoint_layout, convert, iter_converted_slices, iter_tensors,
                            load_tensors, read_rows, weight_map)
from stages.lora import StageAdapters
from stages.packed import PackedLinear, can_pack
from stages.quantize import normalize_quantization

if TYPE_CHECKING:
    from stages.quantize import Quantizer

logger = logging.getLogger(__name__)

# Matrices larger than this are read and packed for oneDNN a block of rows at a time.
PACK_BLOCK_BYTES = 32 * 2**20

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turns "float16" / torch.float16 into a torch dtype, rejecting anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


class Stage(nn.Module):
    """The blocks `[start, end)` of a checkpoint, with their KV cache.

    Args:
        model_dir: a Hugging Face checkpoint directory (config.json + safetensors).
        start: first block (0-based).
        end: one past the last block; `end == num_hidden_layers` makes this the last stage.
        dtype: compute and storage dtype.
        device: where the weights and cache live ("cpu", "cuda", ...).
        num_blocks: KV cache blocks (the pool, allocated once).
        block_size: tokens per block.
        quantization: None/"none" keeps every weight at `dtype`; "int8" or "nf4" quantizes the
            weight matrices of the blocks with bitsandbytes, as transformers'
            `BitsAndBytesConfig` does (embeddings, norms and head stay at `dtype`).
        lora_modules: LoRA adapter name -> PEFT adapter directory (`stages.lora`); the i-th, from 1
            in this order, is what a row asks for with adapter index i. Not with `quantization`.
    """

    def __init__(self, model_dir: str, start: int, end: int, *, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", num_blocks: int = 256, block_size: int = 16,
                 quantization: str | None = None, lora_modules: dict[str, str] | None = None):
        super().__init__()
        began = time.monotonic()
        self.config = AutoConfig.from_pretrained(model_dir)
        num_layers = self.config.num_hidden_layers
        if not 0 <= start < end <= num_layers:
            raise ValueError(f"block range [{start}, {end}) is not within [0, {num_layers})")
        self.start, self.end = start, end
        self.is_first, self.is_last = start == 0, end == num_layers
        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)
        self.quantization = normalize_quantization(quantization)
        if lora_modules and self.quantization:
            raise ValueError(f"LoRA adapters are not supported on quantized stages ({self.quantization})")
        # A quantized stage is one that must fit in little memory: its float head stays as it is
        # loaded (packing holds a block of its rows twice for a moment, and oneDNN adds its own).
        self.packs_linears = can_pack(self.device, self.dtype) and not self.quantization

        model = meta_model(self.config, self.dtype)
        self.arch: Architecture = describe(model)
        owned = owned_modules(model, self.arch, start, end)
        self.lora = StageAdapters(lora_modules or {}, model, self.arch, start, end)  # checked before loading
        self.lora_names: tuple[str, ...] = self.lora.names
        self._load(model_dir, model, owned)
        self.lora.attach(model, self.dtype)

        blocks = _module(model, self.arch.layers)
        self.blocks = nn.ModuleList(blocks[i] for i in range(start, end))
        self.embed = _module(model, self.arch.embed) if self.is_first else None
        self.position_embed = (_module(model, self.arch.position_embed)
                               if self.is_first and self.arch.position_embed else None)
        self.final_norm = (_module(model, self.arch.final_norm)
                           if self.is_last and self.arch.final_norm else None)
        self.head = _module(model, self.arch.head) if self.is_last else None
        self.rotary = _module(model, self.arch.rotary).to(self.device) if self.arch.rotary else None
        del model
        self.to(self.device)

        num_kv_heads, head_dim = kv_shape(self.config)
        self.cache = PagedKVCache(start, end, num_blocks, block_size, num_kv_heads, head_dim, self.dtype, self.device)
        logger.info("stage [%d, %d) of %s loaded: %.1f MiB of weights in %.1f s", start, end, model_dir,
                    self.weight_bytes() / 2**20, time.monotonic() - began)

    def _load(self, model_dir: str, model: nn.Module, owned: dict[str, nn.Module]) -> None:
        files = weight_map(model_dir)
        wanted, conversions = read_plan(model_dir, model, self.arch, owned, files)
        quantizer = None
        if self.quantization:
            from stages.quantize import Quantizer  # bitsandbytes only when asked for

            blocks = [name for name in owned if name.startswith(f"{self.arch.layers}.")]
            quantizer = Quantizer(model, blocks, self.quantization, self.dtype, self.device)
        # Large matrices to pack are read a block of rows at a time, each packed and dropped.
        by_rows = {name: wanted.pop(name) for name in list(wanted) if self._pack_by_rows(model, name)}
        # One tensor at a time: each is cast, quantized or packed and its checkpoint copy dropped.
        release_each = quantizer is not None or self.packs_linears
        for name, tensor in iter_tensors(model_dir, wanted, files, release_each=release_each):
            self._place(model, name, tensor, quantizer)
        for name, conversion in conversions.items():
            if quantizer is not None and quantizer.handles(name) and conversion.num_slices:
                storage = quantizer.experts_storage(model, name)  # expert by expert, never all in float
                for index, value in iter_converted_slices(model_dir, conversion, files, model, self.dtype):
                    storage.set(index, value)
                continue
            stored = load_tensors(model_dir, {key: key for key in conversion.keys}, files)
            for target, value in convert(conversion, stored, model, self.dtype).items():
                self._place(model, target, value, quantizer)
        for name, stored in by_rows.items():
            owner = name.rpartition(".")[0]
            linear = model.get_submodule(owner)
            path = os.path.join(model_dir, files[stored])
            step = max(1, PACK_BLOCK_BYTES // (linear.in_features * self.dtype.itemsize))
            blocks = (read_rows(path, stored, row, min(row + step, linear.out_features)).to(self.dtype)
                      for row in range(0, linear.out_features, step))
            model.set_submodule(owner, PackedLinear(blocks, linear.bias))
        if self.is_last and self.is_first and self.arch.tied:
            owned[self.arch.head].weight = owned[self.arch.embed].weight

    def _pack_by_rows(self, model: nn.Module, name: str) -> bool:
        """Whether `name` is the weight of a layer to pack, too large to read in one piece."""
        owner, _, local = name.rpartition(".")
        if not self.packs_linears or local != "weight":
            return False
        module = model.get_submodule(owner)
        return type(module) is nn.Linear and module.weight.numel() * self.dtype.itemsize > PACK_BLOCK_BYTES

    def _place(self, model: nn.Module, name: str, value: torch.Tensor, quantizer: Quantizer | None) -> None:
        if quantizer is not None and quantizer.handles(name):
            quantizer.load(model, name, value)
            return
        value_dtype = self.dtype if value.is_floating_point() else value.dtype
        set_module_tensor_to_device(model, name, "cpu", value=value.to(value_dtype))
        if self.packs_linears:
            # Packed as soon as it is complete, so that its checkpoint copy goes before the next.
            # A head tied to the embedding of the same stage is never placed: it stays shared.
            owner = name.rpartition(".")[0]
            module = model.get_submodule(owner)
            if type(module) is nn.Linear and all(p.device.type != "meta" for p in module.parameters()):
                model.set_submodule(owner, PackedLinear.from_linear(module))

    def weight_bytes(self) -> int:
        """Bytes of the weights this stage holds (the cache excluded).

        Parameters and buffers, each tensor once; quantized layers also hold statistics that are
        neither: int8 scales per output row, nf4 absmax per 64 weights and a 16-entry code table.
        On CPUs with AVX512-BF16, bitsandbytes repacks an nf4 layer at its first forward and
        keeps its absmax in bfloat16 from then on, so the count drops by 2 bytes per 64 weights.
        """
        tensors = [*self.parameters(), *self.buffers()]
        if self.quantization:
            from stages.quantize import statistics

            tensors += statistics(self)
        seen, total = set(), 0
        for tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        return total

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, tables: list[list[int]], starts: list[int], num_new: list[int],
                all_logits: bool = False, rows: PagedRows | None = None,
                adapters: list[int] | None = None) -> torch.Tensor:
        """Runs one batched step through the stage's blocks.

        Args:
            inputs: token ids (B, T) on the first stage, hidden states (B, T, C) on the others;
                rows are right-padded to the longest. Or, packed (`is_packed`), one row of every
                row's tokens one after another: (1, N) or (1, N, C), N = sum(num_new).
            tables: each row's KV cache blocks, in order (enough for `starts + num_new` tokens).
            starts: position of each row's first new token.
            num_new: real new tokens of each row.
            all_logits: on the last stage, return logits at every position, not just the last.
            rows: the step's `PagedRows`, when the caller has built (and so checked) them already.
            adapters: each row's LoRA adapter: 0 for none, i for `lora_names[i - 1]`; None: all 0.

        Returns:
            hidden states shaped as `inputs`; on the last stage float32 logits (B, V) at each
            row's last real token, or (B, T, V) with `all_logits` ((1, N, V) packed).
        """
        width = inputs.shape[1]
        starts, num_new = [int(s) for s in starts], [int(n) for n in num_new]
        packed = is_packed(inputs, num_new)
        if rows is None:
            rows = self.rows(tables, starts, num_new, width, packed)
        self.lora.selection.begin_step(adapters, num_new, width, packed, self.device)
        self.cache.begin_step(rows)
        new = torch.tensor(num_new)
        if packed:
            positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, num_new)])[None].to(self.device)
            last = torch.tensor(rows.offsets) + new - 1  # each row's last token in the one row
        else:
            # Padding repeats a row's last real position, which keeps learned/rotary tables in range.
            offsets = torch.minimum(torch.arange(width)[None, :], (new - 1)[:, None])
            positions = (torch.tensor(starts)[:, None] + offsets).to(self.device)  # (B, T)

        inputs = inputs.to(self.device)
        if self.is_first:
            hidden = self.embed(inputs)
            if self.position_embed is not None:
                hidden = hidden + self.position_embed(positions)
        else:
            hidden = inputs.to(self.dtype)
        position_embeddings = self.rotary(hidden, positions) if self.rotary is not None else None
        for block in self.blocks:
            out = block(hidden, attention_mask=None, position_ids=positions, use_cache=True,
                        position_embeddings=position_embeddings, paged_rows=rows, paged_windows=self.arch.sliding,
                        **{self.arch.cache_arg: self.cache})
            hidden = out[0] if isinstance(out, tuple) else out
        if not self.is_last:
            return hidden
        if not all_logits and packed:
            hidden = hidden[0, last.to(self.device)]  # (B, C)
        elif not all_logits:
            hidden = hidden[torch.arange(hidden.shape[0]), (new - 1).to(self.device)]  # (B, C)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return self.head(hidden).float()

    def warm_up(self, step_tokens: int, max_rows: int) -> None:
        """Runs the largest steps the stage will be sent, once, before it serves (vLLM's profile
        run), so that its working memory is taken at start, where running out fails the load
        instead of a request.

        A prompt chunk of `step_tokens` tokens, on every other block of the pool so that
        attention reads it as many runs (and copies them into one piece), with logits at every position on
        the last stage (as an echo request asks); then `max_rows` decode rows. It writes KV
        into blocks no sequence holds yet.
        """
        size, num_blocks = self.cache.block_size, self.cache.num_blocks
        stride = 2 if num_blocks >= 2 else 1
        width = max(1, min(step_tokens, (num_blocks // stride) * size))
        table = [i * stride for i in range(-(-width // size))]

        def zeros(num_rows: int, num_tokens: int) -> torch.Tensor:  # token ids, or hidden states
            if self.is_first:
                return torch.zeros(num_rows, num_tokens, dtype=torch.long)
            return torch.zeros(num_rows, num_tokens, self.config.hidden_size, dtype=self.dtype)

        self.forward(zeros(1, width), [table], [0], [width], all_logits=self.is_last)
        rows = max(1, min(max_rows, num_blocks))
        self.forward(zeros(rows, 1), [[i] for i in range(rows)], [0] * rows, [1] * rows)

    def rows(self, tables: list[list[int]], starts: list[int], num_new: list[int], width: int,
             packed: bool = False) -> PagedRows:
        """A step's rows in this stage's KV pool (`PagedRows.build`: raises ValueError for tables
        that do not fit the pool)."""
        return PagedRows.build(tables, starts, num_new, width, self.cache.block_size, self.cache.num_blocks, packed)


def is_packed(inputs: torch.Tensor, num_new: list[int]) -> bool:
    """Whether a step's `inputs` hold its rows packed into one row (a step of one row is either)."""
    return inputs.shape[0] == 1 and len(num_new) > 1


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The whole model's module tree on the meta device (no memory), in eval mode.

    Buffers stay real (include_buffers=False): rotary frequencies and the like are computed in
    __init__ and are not in checkpoints.
    """
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION, dtype=dtype)
    return model.eval()


def owned_modules(model: nn.Module, arch: Architecture, start: int, end: int) -> dict[str, nn.Module]:
    """The modules a stage of blocks `[start, end)` holds: its blocks, plus the embeddings on the
    first stage and the final norm and head on the last."""
    names = [f"{arch.layers}.{i}" for i in range(start, end)]
    if start == 0:
        names += [arch.embed] + ([arch.position_embed] if arch.position_embed else [])
    if end == model.config.num_hidden_layers:
        names += ([arch.final_norm] if arch.final_norm else []) + [arch.head]
    return {name: _module(model, name) for name in names}


def read_plan(model_dir: str, model: nn.Module, arch: Architecture, owned: dict[str, nn.Module],
              files: dict[str, str]) -> tuple[dict[str, str], dict[str, Conversion]]:
    """What a stage reads from the checkpoint for its `owned` modules.

    Returns:
        (model tensor name -> stored name for the tensors stored as they are, target -> `Conversion`
        for those built from several stored tensors).

    Raises:
        ValueError: a tensor of the stage is missing from the checkpoint.
    """
    layout = checkpoint_layout(model, files)
    is_first = arch.embed in owned
    wanted: dict[str, str] = {}
    conversions: dict[str, Conversion] = {}
    for prefix, module in owned.items():
        for local, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            name = f"{prefix}.{local}"
            if name in layout.names:
                wanted[name] = layout.names[name]
            elif name in layout.conversions:  # one conversion may fill several tensors
                conversions[layout.conversions[name].target] = layout.conversions[name]
            elif prefix == arch.head and arch.tied:
                if not is_first:  # stage 0 re-ties its head to the embedding it loads
                    wanted[name] = layout.names[f"{arch.embed}.{local}"]  # tied: stored once
            elif tensor.device.type == "meta":
                raise ValueError(f"{model_dir}: tensor {name} is missing from the checkpoint")
    return wanted, conversions


def stored_tensors(model_dir: str, start: int, end: int) -> set[str]:
    """The checkpoint's tensors (stored names) that a stage of blocks `[start, end)` reads: what a
    node without the checkpoint must fetch for it. Reads only config.json and the safetensors
    headers (or the index)."""
    config = AutoConfig.from_pretrained(model_dir)
    model = meta_model(config, torch.float32)
    arch = describe(model)
    wanted, conversions = read_plan(model_dir, model, arch, owned_modules(model, arch, start, end),
                                    weight_map(model_dir))
    return set(wanted.values()) | {key for conversion in conversions.values() for key in conversion.keys}


def kv_shape(config) -> tuple[int, int]:
    """(key/value heads, head size) of a config's attention."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_kv_heads, head_dim
