"""A stage's KV cache as a fixed pool of blocks, and attention that reads the blocks in place.

The pool of each block (layer) is one tensor `(1, kv_heads, num_blocks * block_size, head_dim)`,
allocated once. A step gives each row a block table (physical blocks in logical order); the new
keys and values are written where the table says, and attention reads each row's context as
views of the pool: one view per run of physically consecutive blocks (a sequence's blocks are
usually one run; a shared prefix and the private rest make two). Runs are combined with their
log-sum-exp, the way flash attention combines tiles, so no step copies a context; only a row of
more than `MAX_RUNS` runs is copied into one piece.

The attention function is registered with transformers' `AttentionInterface` as "stagewise", so
transformers' own attention modules (projections, rotary, norms) run unchanged and call it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

# A row whose context is several runs computes its float32 scores (heads, queries, context) this
# many bytes at a time; the planner counts them in a stage's working memory. Pure Python.
from placement.model_spec import SCORES_TILE_BYTES

ATTENTION = "stagewise"
# Steps whose rows are all this short gather them into one padded batch (a copy of a few KiB
# per row) for one attention call: cheaper than an attention call per row.
GATHER_MAX_TOKENS = 48  # measured: an attention call per row is cheaper from about 48 tokens on
# A row whose context is more runs of blocks than this is copied into one piece for one attention
# call. Measured (125M Llama, one stage, batch 16, 1,000 tokens of context, every block its own
# run): 1,202 ms a decode step run by run, 249 ms with the copies (107 ms when each row is one run).
MAX_RUNS = 4


@dataclass(frozen=True)
class PagedRows:
    """Where one step's tokens go in the pool and what each row reads.

    Attributes:
        starts: (B,) position of each row's first new token.
        num_new: (B,) real new tokens of each row (rows are right-padded to the longest).
        write_index: (N,) flat pool position of each real new token, in row order.
        valid: (B, T) True where a token is real, None when every one is.
        runs: per row, (flat start, flat end, first logical position) of each run of consecutive
            blocks that holds its tokens `0 .. starts + num_new`.
        gather_index: (B, L) flat pool position of each row's tokens in order (padded with 0),
            when every row holds at most `GATHER_MAX_TOKENS` (else None).
        offsets: for a packed step (the rows' tokens one after another in a single row of
            `sum(num_new)`, so that a decode row next to a prompt chunk costs one token, not the
            chunk's width), where each row's tokens begin; None when rows are padded.
    """

    starts: list[int]
    num_new: list[int]
    write_index: torch.Tensor
    valid: torch.Tensor | None
    runs: list[list[tuple[int, int, int]]]
    gather_index: torch.Tensor | None = None
    offsets: list[int] | None = None  # packed steps: where each row's tokens begin in the one row
    masks: dict = field(default_factory=dict)  # window -> (B, 1, T, L) mask of the gathered batch
    plans: dict = field(default_factory=dict)  # (window, device, runs_only) -> `row_plans`

    @classmethod
    def build(cls, tables: list[list[int]], starts: list[int], num_new: list[int], width: int,
              block_size: int, num_blocks: int, packed: bool = False) -> PagedRows:
        """The step's rows in a pool of `num_blocks` blocks of `block_size` tokens (`packed`: the
        rows' tokens come one after another in one row of `width == sum(num_new)`).

        Raises:
            ValueError: a block outside the pool, a row with fewer blocks than its tokens need, or
                two rows writing one position.
        """
        write, runs = [], []
        for table, start, new in zip(tables, starts, num_new):
            length = start + new
            if any(not 0 <= block < num_blocks for block in table):
                raise ValueError(f"a block beyond this stage's {num_blocks}")
            if -(-length // block_size) > len(table):
                raise ValueError(f"a row of {length} tokens needs more than its {len(table)} blocks")
            write += [table[p // block_size] * block_size + p % block_size for p in range(start, length)]
            row_runs: list[tuple[int, int, int]] = []
            for logical in range(0, length, block_size):
                flat = table[logical // block_size] * block_size
                end = flat + min(block_size, length - logical)
                if row_runs and row_runs[-1][1] == flat:
                    row_runs[-1] = (row_runs[-1][0], end, row_runs[-1][2])
                else:
                    row_runs.append((flat, end, logical))
            runs.append(row_runs)
        if len(set(write)) != len(write):
            raise ValueError("two rows write one cache position")
        if packed:
            if width != sum(num_new):
                raise ValueError(f"a packed step of {width} tokens for rows of {sum(num_new)}")
            offsets = [0, *itertools.accumulate(num_new)][:-1]
            return cls(list(starts), list(num_new), torch.tensor(write, dtype=torch.long), None, runs, None, offsets)
        valid = torch.arange(width)[None, :] < torch.tensor(num_new)[:, None]
        lengths = [start + new for start, new in zip(starts, num_new)]
        gather = None
        if max(lengths) <= GATHER_MAX_TOKENS:
            gather = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
            for b, row_runs in enumerate(runs):
                flat = [p for fs, fe, _ in row_runs for p in range(fs, fe)]
                gather[b, :len(flat)] = torch.tensor(flat)
        return cls(list(starts), list(num_new), torch.tensor(write, dtype=torch.long),
                   None if bool(valid.all()) else valid, runs, gather)

    def gathered_mask(self, window: int | None, device) -> torch.Tensor:
        """(B, 1, T, L) True where a query of the gathered batch sees a key (padded queries see
        what their row's last real one sees, so that no row is all masked)."""
        if window not in self.masks:
            new = torch.tensor(self.num_new)
            t = torch.minimum(torch.arange(max(self.num_new))[None, :], (new - 1)[:, None])
            queries = (torch.tensor(self.starts)[:, None] + t)[:, :, None]  # (B, T, 1)
            keys = torch.arange(self.gather_index.shape[1])[None, None, :]  # (1, 1, L)
            visible = keys <= queries
            if window is not None:
                visible &= keys > queries - window
            self.masks[window] = visible[:, None].to(device)
        return self.masks[window]

    def row_plans(self, window: int | None, device, runs_only: bool) -> list[tuple]:
        """What each row's attention reads, worked out once a step for every layer with `window`:
        (row, offset, new tokens, positions, parts, piece, mask). `piece` is the pool's keys the
        row reads in one call (a slice of one run, or the index of many runs copied into one),
        `mask` its (T, L) visibility (None: a single new token sees every key); `piece` is None
        when the row's runs are read one by one: neither one run nor too many, or `runs_only`."""
        cache_key = (window, str(device), runs_only)
        if cache_key not in self.plans:
            plans = []
            for b, (start, new, runs) in enumerate(zip(self.starts, self.num_new, self.runs)):
                # row b's queries: (b, 0 ..) when rows are padded, (0, offset ..) in a packed step
                r, o = (0, self.offsets[b]) if self.offsets is not None else (b, 0)
                positions = torch.arange(start, start + new, device=device)
                first = 0 if window is None else max(0, start - window + 1)  # the first query's first key
                parts = [(fs + max(first - logical, 0), fe, max(logical, first)) for fs, fe, logical in runs
                         if logical + (fe - fs) > first]
                piece = mask = None
                if not runs_only and (len(parts) == 1 or len(parts) > MAX_RUNS):
                    # One run is read as a view of the pool. Many short runs (sequences that grew
                    # together take interleaved blocks) are copied into one piece: a few small calls
                    # per run would cost far more than copying the row's context once.
                    if len(parts) == 1:
                        piece = slice(parts[0][0], parts[0][1])
                    else:
                        piece = torch.cat([torch.arange(fs, fe, device=device) for fs, fe, _ in parts])
                    if new > 1:  # one new token sees every key of its (window-trimmed) runs
                        logical = torch.cat([torch.arange(lg, lg + fe - fs, device=device) for fs, fe, lg in parts])
                        mask = _visible(positions, logical, window)
                plans.append((r, o, new, positions, parts, piece, mask))
            self.plans[cache_key] = plans
        return self.plans[cache_key]


class PagedKVCache:
    """Keys and values of the blocks `[start, end)` in a pool of `num_blocks` blocks.

    Follows the `update(key, value, layer_idx, ...)` protocol of transformers' `Cache`; the
    "stagewise" attention function reads what `update` wrote through the step's `PagedRows`.
    """

    def __init__(self, start: int, end: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.start, self.end = start, end
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (1, num_kv_heads, num_blocks * block_size, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(start, end)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(start, end)]
        self.rows: PagedRows | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def can_copy(self, pairs) -> bool:
        """Whether (source, destination) block pairs lie in the pool, each destination written
        once and never also a source."""
        sources, targets = {s for s, _ in pairs}, [d for _, d in pairs]
        return (all(0 <= b < self.num_blocks for pair in pairs for b in pair) and len(set(targets)) == len(targets)
                and not sources & set(targets))

    def copy_blocks(self, pairs) -> None:
        """Copies each (source, destination) block's keys and values, in every layer (copy-on-write
        of the blocks two beams shared, before one writes into its own)."""
        if not pairs:
            return
        size = self.block_size
        src = torch.cat([torch.arange(s * size, (s + 1) * size) for s, _ in pairs]).to(self.keys[0].device)
        dst = torch.cat([torch.arange(d * size, (d + 1) * size) for _, d in pairs]).to(self.keys[0].device)
        for pool in self.keys + self.values:
            pool[0, :, dst] = pool[0, :, src]

    def begin_step(self, rows: PagedRows) -> None:
        self.rows = rows

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Writes the step's new keys/values (B, H, T, D) into the pool; returns the layer's pool."""
        rows, k_pool, v_pool = self.rows, self.keys[layer_idx - self.start], self.values[layer_idx - self.start]
        new_k, new_v = key.transpose(1, 2), value.transpose(1, 2)  # (B, T, H, D)
        if rows.valid is not None:
            new_k, new_v = new_k[rows.valid], new_v[rows.valid]
        else:
            new_k, new_v = new_k.reshape(-1, *new_k.shape[2:]), new_v.reshape(-1, *new_v.shape[2:])
        k_pool[0, :, rows.write_index] = new_k.transpose(0, 1).to(k_pool.dtype)
        v_pool[0, :, rows.write_index] = new_v.transpose(0, 1).to(v_pool.dtype)
        return k_pool, v_pool


def _visible(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    visible = keys[None, :] <= queries[:, None]
    if window is not None:
        visible &= keys[None, :] > queries[:, None] - window
    return visible


def _runs_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, parts: list, positions: torch.Tensor,
                    window: int | None, scale: float, softcap: float | None) -> torch.Tensor:
    """Queries `q` (H, g, T, D) of one row over its runs `parts` of the pool, each run's
    softmax numerator and log-sum-exp combined; (H, g*T, D) float32. The g query heads that
    share a key head go as g*T queries over it, so no key is repeated. On the CPU each run is one
    call of the fused kernel, which returns its log-sum-exp; elsewhere (and with a soft cap) the
    scores are computed here."""
    heads, groups, new, dim = q.shape
    fused = softcap is None and q.device.type == "cpu"
    qg = q.reshape(1, heads, groups * new, dim)
    if not fused:
        qg = qg[0].float() * scale
    total, lse = None, None
    for fs, fe, logical in parts:
        visible = _visible(positions, torch.arange(logical, logical + fe - fs, device=q.device), window).repeat(groups, 1)
        if fused:
            mask = None if bool(visible.all()) else torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~visible, float("-inf"))
            run_out, run_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qg, key[:, :, fs:fe], value[:, :, fs:fe], attn_mask=mask, scale=scale)
            # the kernel gives a query that sees none of the run 0 as its log-sum-exp
            run_out, run_lse = run_out[0].float(), run_lse[0, :, :, None].masked_fill(~visible.any(-1)[None, :, None],
                                                                                     float("-inf"))
        else:
            scores = torch.matmul(qg, key[0, :, fs:fe].transpose(1, 2).float())  # (H, g*T, L)
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            scores = scores.masked_fill(~visible[None], float("-inf"))
            run_lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (H, g*T, 1)
            run_out = torch.matmul(torch.exp(scores - run_lse).nan_to_num(0.0), value[0, :, fs:fe].float())
        if total is None:
            total, lse = run_out, run_lse
        else:
            merged = torch.logaddexp(lse, run_lse)
            total = total * torch.exp(lse - merged).nan_to_num(0.0) + run_out * torch.exp(run_lse - merged).nan_to_num(0.0)
            lse = merged
    return total


def paged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                    scaling: float | None = None, dropout: float = 0.0, *, paged_rows: PagedRows,
                    paged_windows: tuple[int | None, ...] = (), softcap: float | None = None, **kwargs):
    """Attention of each row over its blocks in the pool.

    Args:
        query: (B, Hq, T, D) queries of the step's new tokens ((1, Hq, N, D) in a packed step).
        key, value: the layer's pool (1, H, P, D), as `PagedKVCache.update` returns it.
        attention_mask: unused (each row's causal and window limits come from its positions).
        scaling: the softmax scale (None: 1/sqrt(D)).
        paged_rows: the step's rows (passed down from the stage's forward).
        paged_windows: per block (global index), its sliding window or None (full causal).
        softcap: Gemma 2's logit soft cap, or None.

    Returns:
        ((B, T, Hq, D) outputs, None), as transformers' attention functions return them.
    """
    window = paged_windows[module.layer_idx] if paged_windows else None
    num_rows, num_heads, width, dim = query.shape
    groups = num_heads // key.shape[1]
    scale = scaling if scaling is not None else dim ** -0.5
    if paged_rows.gather_index is not None and softcap is None:  # short rows: one padded batch
        index = paged_rows.gather_index.to(key.device)
        keys, values = key[0][:, index].transpose(0, 1), value[0][:, index].transpose(0, 1)  # (B, H, L, D)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=paged_rows.gathered_mask(window, query.device),
                                             scale=scale, enable_gqa=groups > 1)
        return out.transpose(1, 2), None
    outs = []
    for r, o, new, positions, parts, piece, mask in paged_rows.row_plans(window, query.device, softcap is not None):
        q = query[r:r + 1, :, o:o + new]  # (1, Hq, T_b, D)
        if piece is not None:
            outs.append(F.scaled_dot_product_attention(q, key[:, :, piece], value[:, :, piece], attn_mask=mask,
                                                       scale=scale, enable_gqa=groups > 1))
            continue
        # Several runs: each run's softmax numerator and log-sum-exp, combined; queries a tile at a
        # time, so that the float32 scores of a long chunk over a long context stay bounded.
        q = q[0].reshape(key.shape[1], groups, new, dim)  # (H, g, T_b, D)
        context = sum(fe - fs for fs, fe, _ in parts)
        tile = max(1, SCORES_TILE_BYTES // (num_heads * context * 4))
        tiles = [_runs_attention(q[:, :, t0:t0 + tile], key, value, parts, positions[t0:t0 + tile], window, scale,
                                 softcap).reshape(num_heads, -1, dim) for t0 in range(0, new, tile)]
        outs.append(torch.cat(tiles, dim=1)[None].to(query.dtype))
    if paged_rows.offsets is not None:  # packed: the rows' tokens one after another
        return torch.cat(outs, dim=2).transpose(1, 2), None
    if all(new == width for new in paged_rows.num_new):
        return torch.cat(outs, dim=0).transpose(1, 2), None
    out = query.new_zeros(num_rows, width, num_heads, dim)
    for b, attended in enumerate(outs):
        out[b, :attended.shape[2]] = attended[0].transpose(0, 1)
    return out, None


AttentionInterface.register(ATTENTION, paged_attention)
