"""How many bytes each part of a model holds: blocks, embeddings and head.

A `ModelSpec` is what the planner needs to know about a model, in plain numbers. It is built
from element counts (`ModelTallies`) that do not depend on the dtype or the quantization, so
one pass over the model on the meta device (see `placement.meta_count`) serves every dtype and
quantization, and the planner can tell whether a quantization would make a model fit.

Quantization follows bitsandbytes as the stages apply it: only the weight matrices inside the
blocks shrink (linear layers, GPT-2's Conv1D, and the 3-D expert parameters of mixture-of-experts
layers); biases, norms, routers, embeddings and the head stay at the dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

DTYPE_BYTES: Mapping[str, int] = types.MappingProxyType(
    {"float16": 2, "bfloat16": 2, "float32": 4}
)
QUANTIZATIONS = ("int8", "nf4")
NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit blocksize; one float32 absmax per block, no double quant
NF4_CODE_BYTES = 64  # bnb's nf4 quant state holds the 16 float32 code values per tensor
SCALE_BYTES = 4  # int8 keeps a float32 scale per output row, nf4 a float32 absmax per block


def check_dtype(dtype: str) -> str:
    """Returns `dtype` if the planner knows its size, else raises ValueError."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return dtype


def normalize_quantization(quantization: str | None) -> str | None:
    """Maps `None`/`"none"`/`""` to None and checks `int8`/`nf4`.

    Args:
        quantization: as given by a user or the builder's `quantization` argument.

    Returns:
        None for no quantization, else `"int8"` or `"nf4"`.
    """
    if quantization is None or str(quantization).lower() in ("", "none"):
        return None
    name = str(quantization).lower()
    if name not in QUANTIZATIONS:
        raise ValueError(f"quantization must be none, int8 or nf4, got {quantization!r}")
    return name


def precision_label(dtype: str, quantization: str | None) -> str:
    """`float16`, or `int8 blocks, float16 elsewhere` for people to read."""
    return f"{quantization} blocks, {dtype} elsewhere" if quantization else dtype


@dataclass(frozen=True)
class PartTally:
    """Element counts of one part of a model: a block, the embeddings or the head."""

    params: int = 0  # parameter elements; a stage's compute is proportional to these
    float_numel: int = 0  # floating elements kept at the dtype: norms, biases, routers, buffers
    matrix_numel: int = 0  # elements of the weight matrices that int8/nf4 shrink (blocks only)
    matrix_rows: int = 0  # output rows of those matrices: int8 keeps one scale per row
    matrix_groups: int = 0  # NF4_BLOCKSIZE-element groups of those: nf4 keeps one absmax each
    fixed_bytes: int = 0  # non-floating persistent buffers, stored as they are
    matrix_count: int = 0  # quantized tensors: nf4 keeps a 16-entry float32 code table with each

    def nbytes(self, dtype: str, quantization: str | None) -> int:
        """Bytes this part holds at `dtype` with `quantization` (None, "int8" or "nf4")."""
        dtype_bytes = DTYPE_BYTES[check_dtype(dtype)]
        if quantization is None:
            matrix_bytes = self.matrix_numel * dtype_bytes
        elif quantization == "int8":  # bnb Int8Params: int8 data + float32 SCB per row
            matrix_bytes = self.matrix_numel + SCALE_BYTES * self.matrix_rows
        elif quantization == "nf4":  # bnb Params4bit: two weights a byte + float32 absmax per block
            matrix_bytes = (math.ceil(self.matrix_numel / 2) + SCALE_BYTES * self.matrix_groups
                            + NF4_CODE_BYTES * self.matrix_count)
        else:
            raise ValueError(f"unknown quantization {quantization!r}")
        return self.float_numel * dtype_bytes + matrix_bytes + self.fixed_bytes


@dataclass(frozen=True)
class ModelTallies:
    """Element counts of a whole model, independent of dtype and quantization."""

    blocks: tuple[PartTally, ...]  # index = block
    embed: PartTally  # token and learned position embeddings (and their norm): stage 0
    head: PartTally  # final norm and LM head, the tied matrix included: last stage
    tied_numel: int  # elements shared by embed and head (0 when the embeddings are not tied)
    kv_numel_per_token: tuple[int, ...]  # K and V elements cached per token, per block
    model_type: str = ""
    act_numel_per_token: tuple[int, ...] = ()  # activation elements per token of a step, per block
    vocab_size: int = 0  # logits per row on the last stage


# A stage's working memory, besides its weights and KV pool (see `ModelSpec.stage_work_bytes`).
# Measured on this project's CPU stages (glibc, 4 MiB mmap threshold; the 125M Llama in 4 stages
# under 3 rounds of 64 concurrent requests): a step's live activations take up to 1.6x their size
# in the heap, and a serving stage holds 60-80 MiB more than a bare replica with the same imports
# besides its weights, pool and largest step: oneDNN's compiled primitives (64 shapes kept, see
# `app.builder.stage_env`), the heap between steps of every size, the data plane's threads.
WORK_SLACK = 2.0
STAGE_RUNTIME_BYTES = 96 * 2**20
# A row whose context is several runs of blocks computes its float32 attention scores this many
# bytes at a time (stages.kv_cache tiles its queries), a few copies of them alive at once.
SCORES_TILE_BYTES = 8 * 2**20
SCORES_COPIES = 4


def kv_pool_blocks(kv_tokens: int, block_size: int) -> int:
    """The KV cache blocks of a stage replica: `kv_tokens` rounded up to whole blocks. The stage
    allocates them once at start; the planner reserves their bytes (`ModelSpec.stage_kv_bytes`
    of `blocks * block_size` tokens); nothing grows while serving."""
    if kv_tokens < 1 or block_size < 1:
        raise ValueError("a KV pool needs at least one token and blocks of at least one token")
    return -(-kv_tokens // block_size)


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of a model's parts, as the planner sees them.

    A stage holding blocks `[start, end)` holds `block_bytes[start:end]`, plus `embed_bytes` when
    `start == 0`, plus `head_bytes` when `end == num_layers`. With tied embeddings the head is a
    copy of the embedding matrix (`tied_bytes` of it), held once when one stage is both first
    and last.

    Hand-written specs (tests) may leave out the parameter counts: they default to bytes divided
    by the dtype's size, so compute is then proportional to bytes.
    """

    block_bytes: tuple[int, ...]  # weight bytes per block, index = block
    embed_bytes: int  # token + learned position embeddings: stage 0
    head_bytes: int  # final norm + LM head (a copy of the embeddings when tied): last stage
    kv_bytes_per_token: tuple[int, ...]  # KV-cache bytes per cached token, per block
    tied_bytes: int = 0  # bytes of head_bytes that are the embedding matrix itself
    dtype: str = "float16"
    quantization: str | None = None
    block_params: tuple[int, ...] | None = None  # parameters per block (default: bytes/dtype)
    embed_params: int | None = None
    head_params: int | None = None
    model_type: str = ""
    block_act_numel: tuple[int, ...] = ()  # activation elements per token of a step, per block
    vocab_size: int = 0  # logits per row of the last stage
    step_tokens: int = 0  # the most tokens a step carries (0: no working memory counted)
    tallies: ModelTallies | None = field(default=None, repr=False)  # to re-derive other dtypes
    _prefix_bytes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _prefix_kv: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _prefix_params: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        setter = object.__setattr__  # frozen: derived fields are set once, here
        setter(self, "quantization", normalize_quantization(self.quantization))
        setter(self, "block_bytes", tuple(int(b) for b in self.block_bytes))
        setter(self, "kv_bytes_per_token", tuple(int(b) for b in self.kv_bytes_per_token))
        if not self.block_bytes:
            raise ValueError("a model needs at least one block")
        if len(self.kv_bytes_per_token) != len(self.block_bytes):
            raise ValueError("kv_bytes_per_token needs one entry per block")
        if self.block_act_numel and len(self.block_act_numel) != len(self.block_bytes):
            raise ValueError("block_act_numel needs one entry per block (or none)")
        sizes = (*self.block_bytes, *self.kv_bytes_per_token, self.embed_bytes, self.head_bytes)
        if min(sizes) < 0 or not 0 <= self.tied_bytes <= min(self.embed_bytes, self.head_bytes):
            raise ValueError("sizes must be >= 0 and tied_bytes at most embed and head bytes")
        per = DTYPE_BYTES[self.dtype]
        if self.block_params is None:
            setter(self, "block_params", tuple(b // per for b in self.block_bytes))
        if self.embed_params is None:
            setter(self, "embed_params", self.embed_bytes // per)
        if self.head_params is None:
            setter(self, "head_params", self.head_bytes // per)
        setter(self, "block_params", tuple(int(p) for p in self.block_params))
        if len(self.block_params) != len(self.block_bytes):
            raise ValueError("block_params needs one entry per block")
        setter(self, "_prefix_bytes", _prefix_sums(self.block_bytes))
        setter(self, "_prefix_kv", _prefix_sums(self.kv_bytes_per_token))
        setter(self, "_prefix_params", _prefix_sums(self.block_params))

    @classmethod
    def from_tallies(
        cls, tallies: ModelTallies, dtype: str = "float16", quantization: str | None = None
    ) -> ModelSpec:
        """Sizes at `dtype` with `quantization` from dtype-independent element counts."""
        quantization = normalize_quantization(quantization)
        per = DTYPE_BYTES[check_dtype(dtype)]
        return cls(
            block_bytes=tuple(t.nbytes(dtype, quantization) for t in tallies.blocks),
            embed_bytes=tallies.embed.nbytes(dtype, None),
            head_bytes=tallies.head.nbytes(dtype, None),
            kv_bytes_per_token=tuple(n * per for n in tallies.kv_numel_per_token),
            tied_bytes=tallies.tied_numel * per,
            dtype=dtype,
            quantization=quantization,
            block_params=tuple(t.params for t in tallies.blocks),
            embed_params=tallies.embed.params,
            head_params=tallies.head.params,
            model_type=tallies.model_type,
            block_act_numel=tallies.act_numel_per_token,
            vocab_size=tallies.vocab_size,
            tallies=tallies,
        )

    @classmethod
    def from_config(
        cls, config: Any, dtype: str = "float16", quantization: str | None = None
    ) -> ModelSpec:
        """Counts a model from its config, building it on the meta device (no weights read).

        Args:
            config: a `config.json` as a dict (with `model_type`) or a transformers config.
            dtype: `float16`, `bfloat16` or `float32`.
            quantization: None/`"none"`, `"int8"` or `"nf4"`.

        Returns:
            The model's spec.
        """
        from placement.meta_count import count_tallies  # torch and transformers load only here

        check_dtype(dtype)
        quantization = normalize_quantization(quantization)
        return cls.from_tallies(count_tallies(config), dtype, quantization)

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, dtype: str = "float16", quantization: str | None = None
    ) -> ModelSpec:
        """`from_config` on `model_dir/config.json`; see there for the arguments."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        return cls.from_config(json.loads(path.read_text()), dtype, quantization)

    def with_options(
        self, dtype: str | None = None, quantization: str | None = "keep"
    ) -> ModelSpec:
        """The same model at another dtype or quantization (needs `tallies`).

        Args:
            dtype: the new dtype, or None to keep this one.
            quantization: the new quantization (None for none), or `"keep"` to keep this one.
        """
        if self.tallies is None:
            raise ValueError("this spec was written by hand: it has no tallies to re-derive from")
        new_quantization = self.quantization if quantization == "keep" else quantization
        spec = ModelSpec.from_tallies(self.tallies, dtype or self.dtype, new_quantization)
        return spec.with_step_tokens(self.step_tokens)

    def with_step_tokens(self, step_tokens: int) -> ModelSpec:
        """The same model, its stages computing steps of up to `step_tokens` tokens."""
        if step_tokens < 0:
            raise ValueError(f"step_tokens must be >= 0, got {step_tokens}")
        return dataclasses.replace(self, step_tokens=int(step_tokens))

    @property
    def num_layers(self) -> int:
        """Number of blocks."""
        return len(self.block_bytes)

    @property
    def num_params(self) -> int:
        """Parameters of the whole model, a tied matrix counted once."""
        tied_params = self.tied_bytes // DTYPE_BYTES[self.dtype]
        total = sum(self.block_params) + self.embed_params + self.head_params
        return total - tied_params

    @property
    def total_weight_bytes(self) -> int:
        """Bytes of the whole model in one stage (a tied matrix counted once)."""
        return self.stage_weight_bytes(0, self.num_layers)

    def stage_weight_bytes(self, start: int, end: int) -> int:
        """Weight bytes a stage holding blocks `[start, end)` holds."""
        total = self._prefix_bytes[end] - self._prefix_bytes[start]
        if start == 0:
            total += self.embed_bytes
        if end == self.num_layers:
            total += self.head_bytes
            if start == 0:
                total -= self.tied_bytes
        return total

    def stage_kv_bytes(self, start: int, end: int, kv_tokens: int) -> int:
        """KV-cache bytes for `kv_tokens` cached tokens in blocks `[start, end)`: a stage's block
        pool of `kv_pool_blocks(kv_tokens, block_size) * block_size` tokens is exactly this."""
        return kv_tokens * (self._prefix_kv[end] - self._prefix_kv[start])

    def stage_work_bytes(self, start: int, end: int) -> int:
        """Working memory of a stage holding blocks `[start, end)` whose steps carry up to
        `step_tokens` tokens (0 when `step_tokens` is 0, or for a spec without activation sizes).

        The largest block's activations for a whole step (`WORK_SLACK` times their size: the
        heap's slack), the attention scores of one tile (`SCORES_TILE_BYTES`, `SCORES_COPIES`
        times), on the last stage float32 logits for every token of the step (an echo request
        asks for them; they are sent as they are, without a copy), and `STAGE_RUNTIME_BYTES`. A stage
        takes its peak once at start (`Stage.warm_up`), so a plan that counts it cannot run out
        under load.
        """
        if not self.step_tokens or not self.block_act_numel:
            return 0
        per = DTYPE_BYTES[self.dtype]
        activations = WORK_SLACK * self.step_tokens * max(self.block_act_numel[start:end]) * per
        total = int(activations) + SCORES_COPIES * SCORES_TILE_BYTES + STAGE_RUNTIME_BYTES
        if end == self.num_layers:
            total += self.step_tokens * self.vocab_size * 4
        return total

    def stage_bytes(self, start: int, end: int, kv_tokens: int) -> int:
        """Everything a stage holding blocks `[start, end)` needs: weights, a KV pool of
        `kv_tokens` tokens and its working memory."""
        return (self.stage_weight_bytes(start, end) + self.stage_kv_bytes(start, end, kv_tokens)
                + self.stage_work_bytes(start, end))

    def stage_params(self, start: int, end: int) -> int:
        """Parameters a stage multiplies with per token: its blocks, and the head if last.

        Embedding lookups do no multiplication, so the embeddings are left out.
        """
        total = self._prefix_params[end] - self._prefix_params[start]
        if end == self.num_layers:
            total += self.head_params
        return total


def _prefix_sums(values: tuple[int, ...]) -> tuple[int, ...]:
    sums = [0]
    for value in values:
        sums.append(sums[-1] + value)
    return tuple(sums)
