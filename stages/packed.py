"""Linear layers with their weights laid out once for oneDNN: the fast CPU path.

On the CPU, `nn.Linear` in float32 goes to MKL's sgemm, which re-lays the weight out for its
kernel at every call; for the few rows of a decode step that costs more than the multiplication.
oneDNN can lay a weight out once, ahead of time, for its own kernels, which is what torch.compile's
CPU backend does to frozen weights and what IPEX's `optimize` does. The arithmetic stays float32
(or bfloat16): only the order of the sums changes, so outputs differ from MKL's in the last bits,
as they already do between batch sizes.

Measured on this project's 2-core CPU, one thread, 16 rows: 40 `Linear(768, 2048)` in 54 ms with
`nn.Linear` against 29 ms packed, and a 32000-token LM head in 26 ms against 10 ms (`python
load_tests/step_compute.py` measures whole decode steps).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linear layers on `device` at `dtype` can run on prepacked oneDNN weights."""
    if device.type != "cpu" or dtype not in PACKABLE_DTYPES:
        return False
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX-512 CPUs


class PackedLinear(nn.Module):
    """`nn.Linear` computed by oneDNN from weights laid out once, at construction.

    A large weight may come as several blocks of rows, each packed on its own (so that loading
    never holds the whole matrix twice); their outputs are concatenated.

    Args:
        row_blocks: the weight (out_features, in_features), whole or as consecutive blocks of
            rows; each is copied into oneDNN's layout as it comes, and may then be dropped.
        bias: (out_features,) or None.
    """

    def __init__(self, row_blocks: Iterable[torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self.bounds = [0]
        with torch.no_grad():
            for index, block in enumerate(row_blocks):
                self.register_buffer(f"packed_weight_{index}",
                                     torch.ops.mkldnn._reorder_linear_weight(block.detach().contiguous()))
                self.in_features = block.shape[1]
                self.bounds.append(self.bounds[-1] + block.shape[0])
                del block  # before the next block is read
        self.out_features = self.bounds[-1]
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls([linear.weight], linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.bounds) == 2:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight_0, self.bias, "none", [], "")
        # Each block's output is copied into its columns as soon as it is computed: the output
        # and one block's part of it are alive at once, not the output twice (a large head's
        # logits for a whole prompt are tens of MiB).
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for index, (start, end) in enumerate(zip(self.bounds, self.bounds[1:])):
            bias = None if self.bias is None else self.bias[start:end]
            out[..., start:end] = torch.ops.mkldnn._linear_pointwise(x, getattr(self, f"packed_weight_{index}"), bias,
                                                                     "none", [], "")
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocks={len(self.bounds) - 1}")
