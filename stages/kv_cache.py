"""Key/value cache of one stage: preallocated per-sequence slots.

Every open sequence owns one slot (chosen by the scheduler, which knows nothing of tensors), and
a slot holds that sequence's keys and values for every block of the stage. A batched step names
the slot, the first new position and the number of new tokens of each row, so sequences of
different lengths are decoded in one forward. Nothing is ever concatenated: new keys are written
in place, and attention reads `[:length]` of each row's slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepRows:
    """Where the new tokens of one batched step go in the cache.

    Attributes:
        slots: (B,) cache slot of each row.
        starts: (B,) position of each row's first new token (its cached length so far).
        num_new: (B,) real new tokens of each row; rows are right-padded to the longest.
        length: max over rows of `starts + num_new`: the key length attention reads.
        write_slots: (N,) slot of each real new token, N = sum(num_new).
        write_positions: (N,) position of each real new token.
        valid: (B, T) True where a token is real, None when every token is (no padding).
        slot_range: (first, count) when `slots` is a run of consecutive slots, which lets
            attention read a view instead of gathering; None otherwise.
    """

    slots: torch.Tensor
    starts: torch.Tensor
    num_new: torch.Tensor
    length: int
    write_slots: torch.Tensor
    write_positions: torch.Tensor
    valid: torch.Tensor | None
    slot_range: tuple[int, int] | None

    @classmethod
    def build(cls, slots: torch.Tensor, starts: torch.Tensor, num_new: torch.Tensor, width: int) -> StepRows:
        """Derives the write indices of a step.

        Args:
            slots: (B,) int64 slot of each row.
            starts: (B,) int64 first new position of each row.
            num_new: (B,) int64 real new tokens of each row, each in 1..width.
            width: T, the padded number of new tokens per row.

        Returns:
            The step's rows.
        """
        offsets = torch.arange(width)
        valid = offsets[None, :] < num_new[:, None]  # (B, T)
        positions = starts[:, None] + offsets[None, :]  # (B, T)
        all_valid = bool(valid.all())
        slot_list = slots.tolist()
        consecutive = slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list)))
        return cls(
            slots=slots,
            starts=starts,
            num_new=num_new,
            length=int((starts + num_new).max()),
            write_slots=slots[:, None].expand(-1, width)[valid],
            write_positions=positions[valid],
            valid=None if all_valid else valid,
            slot_range=(slot_list[0], len(slot_list)) if consecutive else None,
        )


class KVCache:
    """Keys and values of the blocks `[start, end)` for `num_slots` sequences.

    Follows the `update(key, value, layer_idx, ...)` protocol of transformers' `Cache`,
    which its attention modules call with their global block index.

    Args:
        start: first block of the stage (global index).
        end: one past its last block.
        num_slots: sequences held at once.
        max_len: longest sequence (prompt + output) in tokens.
        num_kv_heads: key/value heads per block.
        head_dim: size of one head.
        dtype: storage dtype (the stage's dtype).
        device: where the cache lives.
    """

    # Buffers start short and double as sequences grow, so that memory follows the longest
    # sequence actually served, not max_len.
    initial_len = 256

    def __init__(self, start: int, end: int, num_slots: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.start, self.end = start, end
        self.num_slots, self.max_len = num_slots, max_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows: StepRows | None = None

    def nbytes(self) -> int:
        """Bytes of the buffers allocated so far."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def begin_step(self, rows: StepRows) -> None:
        """Makes `rows` the step that the next `update` calls write to; grows buffers if needed."""
        if rows.length > self.max_len:
            raise ValueError(f"sequence length {rows.length} exceeds the cache's max_len {self.max_len}")
        if int(rows.slots.max()) >= self.num_slots or int(rows.slots.min()) < 0:
            raise ValueError(f"cache slot out of range 0..{self.num_slots - 1}")
        if rows.length > self.capacity:
            self._grow(rows.length)
        self.rows = rows

    def _grow(self, length: int) -> None:
        capacity = max(self.capacity, self.initial_len)
        while capacity < length:
            capacity *= 2
        capacity = min(capacity, self.max_len)
        shape = (self.num_slots, self.num_kv_heads, capacity, self.head_dim)
        # zeros, not empty: masked positions are multiplied by 0 in attention, and 0 * NaN is NaN.
        new_keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.end - self.start)]
        new_values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.end - self.start)]
        for old, new in zip(self.keys + self.values, new_keys + new_values):
            new[:, :, : self.capacity] = old
        self.keys, self.values, self.capacity = new_keys, new_values, capacity

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes a step's new keys/values and returns each row's keys/values so far.

        Args:
            key: (B, H, T, D) new keys.
            value: (B, H, T, D) new values.
            layer_idx: global block index.
            *args, **kwargs: ignored (rotary is applied before the cache). transformers 5.23 passes
                `cache_kwargs` positionally or not at all, 5.24 passes `kwargs=` (the attention's
                keyword arguments); any later spelling is accepted the same way.

        Returns:
            keys and values, each (B, H, length, D).
        """
        rows = self.rows
        k_buf, v_buf = self.keys[layer_idx - self.start], self.values[layer_idx - self.start]
        # (B, H, T, D) -> (B, T, H, D) so that boolean selection of real tokens gives (N, H, D).
        new_k, new_v = key.transpose(1, 2), value.transpose(1, 2)
        if rows.valid is not None:
            new_k, new_v = new_k[rows.valid], new_v[rows.valid]
        else:
            new_k, new_v = new_k.reshape(-1, *new_k.shape[2:]), new_v.reshape(-1, *new_v.shape[2:])
        k_buf[rows.write_slots, :, rows.write_positions] = new_k.to(self.dtype)
        v_buf[rows.write_slots, :, rows.write_positions] = new_v.to(self.dtype)
        if rows.slot_range is not None:
            first, count = rows.slot_range
            return k_buf[first:first + count, :, : rows.length], v_buf[first:first + count, :, : rows.length]
        return k_buf[rows.slots, :, : rows.length], v_buf[rows.slots, :, : rows.length]
