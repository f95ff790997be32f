"""int8 and nf4 weights through bitsandbytes, applied tensor by tensor while a stage loads.

Linear layers follow transformers' `BitsAndBytesConfig` exactly, so that a quantized stage computes
what `from_pretrained(..., quantization_config=...)` computes: inside the stage's blocks every
`nn.Linear` (and GPT-2's `Conv1D`, transposed as transformers does) becomes bitsandbytes'
`Linear8bitLt` (has_fp16_weights=False, threshold 6.0) or `Linear4bit` (nf4, blocksize 64, no
double quantization, compute dtype = the stage's dtype), except the modules transformers' default
skip list names. Embeddings, norms, routers, biases and the LM head stay at the dtype.

transformers 5 keeps a mixture of experts' weights as 3-D parameters (E, out, in), which that
replacement does not reach; here each expert's matrix is quantized on its own with bitsandbytes'
functional API and dequantized when the experts' eager forward indexes it (`gate_up_proj[e]`).
transformers does not quantize those at all, so this part has no reference to match exactly.

bitsandbytes is imported inside the functions only: a stage that is not quantized never loads it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import inspect
import math
import types

import torch
from torch import nn

# One definition of the options and nf4's blocksize, shared with the planner that counts their bytes.
from placement.model_spec import NF4_BLOCKSIZE, normalize_quantization  # noqa: F401 (re-exported)

INT8_THRESHOLD = 6.0  # BitsAndBytesConfig's llm_int8_threshold default
CPU_PACK_ROWS = 32  # bitsandbytes' CPU nf4 repacking works on blocks of 32 output rows


class Quantizer:
    """Quantizes the weight matrices of some blocks of a meta-device model as they are loaded.

    Args:
        model: the whole model on the meta device (transformers' skip list is computed on it).
        block_names: qualified names of the blocks to quantize, e.g. "model.layers.3".
        quantization: "int8" or "nf4".
        dtype: the stage's dtype: weights are cast to it before quantizing, as transformers does.
        device: where the quantized weights live; quantizing happens there.
    """

    def __init__(self, model: nn.Module, block_names: list[str], quantization: str, dtype: torch.dtype,
                 device: torch.device):
        self.quantization, self.dtype, self.device = quantization, dtype, device
        self.linear: dict[str, bool] = {}  # weight name -> stored as Conv1D (in, out), to transpose
        self.experts: dict[str, tuple[int, ...]] = {}  # 3-D expert parameter name -> shape
        skip = _modules_transformers_skips(model)
        for block_name in block_names:
            self._replace_linear_layers(model, block_name, skip)
            for local, module in model.get_submodule(block_name).named_modules():
                if isinstance(module, nn.modules.conv._ConvNd):
                    continue  # a convolution's forward needs its kernel whole (hybrid models)
                for leaf, param in module.named_parameters(recurse=False):
                    if param.ndim == 3:  # (experts, out, in), as transformers 5 keeps experts
                        self.experts[".".join(filter(None, (block_name, local, leaf)))] = tuple(param.shape)

    def _replace_linear_layers(self, model: nn.Module, block_name: str, skip: list[str]) -> None:
        import bitsandbytes as bnb
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.quantizers_utils import should_convert_module

        block = model.get_submodule(block_name)
        for local, module in list(block.named_modules()):
            name = f"{block_name}.{local}"
            is_conv1d = isinstance(module, Conv1D)
            # Exactly nn.Linear, as transformers: subclasses may have forwards of their own.
            if not (is_conv1d or type(module) is nn.Linear) or not should_convert_module(name, skip):
                continue
            in_features, out_features = module.weight.shape[::-1] if not is_conv1d else module.weight.shape
            with torch.device("meta"):
                if self.quantization == "int8":
                    new = bnb.nn.Linear8bitLt(in_features, out_features, module.bias is not None,
                                              has_fp16_weights=False, threshold=INT8_THRESHOLD)
                else:
                    new = bnb.nn.Linear4bit(in_features, out_features, module.bias is not None, self.dtype,
                                            compress_statistics=False, quant_type="nf4")
                    if out_features % CPU_PACK_ROWS or in_features % 2:
                        # bitsandbytes 0.50's CPU fast path (AVX512-BF16 repacking) asserts these and
                        # crashes (transformers too: Qwen2-MoE's 1-row shared_expert_gate); such a
                        # layer takes the generic path instead.
                        new.support_avx512bf16_for_cpu = False
            new.requires_grad_(False)
            new.train(module.training)  # bitsandbytes takes other kernels in training mode
            model.set_submodule(name, new)
            self.linear[f"{name}.weight"] = is_conv1d

    def handles(self, name: str) -> bool:
        """Whether the model tensor `name` is quantized (else it is loaded at the dtype)."""
        return name in self.linear or name in self.experts

    def load(self, model: nn.Module, name: str, value: torch.Tensor) -> None:
        """Quantizes one float tensor into its place in the model; the float copy can be dropped.

        Args:
            model: the model being loaded.
            name: a tensor for which `handles(name)`.
            value: its full float value (any float dtype, any device).
        """
        if name in self.experts:
            experts = self.experts_storage(model, name)
            for index in range(value.shape[0]):
                experts.set(index, value[index])
            return
        import bitsandbytes as bnb

        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = value.to(self.dtype)  # as transformers casts to the model's dtype before quantizing
        if self.linear[name]:
            value = value.T
        if self.quantization == "int8":
            param = bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, has_fp16_weights=False)
        else:
            old = module.weight.__dict__  # blocksize, quant_type, module, ... of the meta Params4bit
            param = bnb.nn.Params4bit(value, requires_grad=False, **old)
        setattr(module, leaf, param.to(self.device))  # `.to` quantizes, on the target device
        release_freed_memory()

    def experts_storage(self, model: nn.Module, name: str) -> QuantizedExperts:
        """The quantized storage that replaces the 3-D parameter `name`, created on first use."""
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        storage = module._modules.get(leaf)
        if storage is None:
            del module._parameters[leaf]
            storage = QuantizedExperts(self.experts[name], self.quantization, self.dtype, self.device)
            module.add_module(leaf, storage)
            # The grouped/batched experts kernels read the whole 3-D tensor; the eager forward
            # indexes one expert at a time, which dequantizes just that expert.
            eager = inspect.unwrap(type(module).forward)
            module.forward = types.MethodType(eager, module)
        return storage


class QuantizedExperts(nn.Module):
    """An (E, out, in) expert weight held per expert in int8 or nf4; `self[e]` dequantizes one.

    int8: the weight of each output row scaled by its absmax (bitsandbytes' vectorwise int8, as
    `Int8Params`), a float32 scale per row. nf4: each expert's matrix packed two weights a byte,
    a float32 absmax per 64 weights, and one 16-entry code table (bitsandbytes' `quantize_4bit`).
    """

    def __init__(self, shape: tuple[int, ...], quantization: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        from bitsandbytes.functional import get_4bit_type

        self.num_experts, *self.matrix_shape = shape
        self.quantization, self.compute_dtype = quantization, dtype
        rows, numel = math.prod(self.matrix_shape[:-1]), math.prod(self.matrix_shape)
        if quantization == "int8":
            self.register_buffer("data", torch.empty(self.num_experts, rows, self.matrix_shape[-1],
                                                     dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(self.num_experts, rows, device=device))
        else:
            self.register_buffer("data", torch.empty(self.num_experts, (numel + 1) // 2, 1, dtype=torch.uint8,
                                                     device=device))
            self.register_buffer("absmax", torch.empty(self.num_experts, -(-numel // NF4_BLOCKSIZE),
                                                       device=device))
            self.register_buffer("code", get_4bit_type("nf4", device=device))

    @torch.no_grad()
    def set(self, index: int, weight: torch.Tensor) -> None:
        """Quantizes expert `index`'s float matrix into place."""
        import bitsandbytes.functional as F

        weight = weight.to(device=self.data.device, dtype=self.compute_dtype).contiguous()
        if self.quantization == "int8":
            # Int8Params quantizes from float16; the experts do the same so every matrix agrees.
            data, scale, _ = F.int8_vectorwise_quant(weight.reshape(-1, weight.shape[-1]).to(torch.float16))
            self.data[index], self.scale[index] = data, scale
        else:
            data, state = F.quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, compress_statistics=False,
                                          quant_type="nf4")
            self.data[index], self.absmax[index] = data, state.absmax
        release_freed_memory()

    def __getitem__(self, index) -> torch.Tensor:
        """Expert `index`'s matrix (out, in), dequantized to the stage's dtype."""
        import bitsandbytes.functional as F

        if self.quantization == "int8":
            weight = F.int8_vectorwise_dequant(self.data[index], self.scale[index])
        else:
            state = F.QuantState(absmax=self.absmax[index], shape=torch.Size(self.matrix_shape), code=self.code,
                                 blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=self.compute_dtype)
            weight = F.dequantize_4bit(self.data[index], state)
        return weight.reshape(self.matrix_shape).to(self.compute_dtype)

    def __len__(self) -> int:
        return self.num_experts

    def extra_repr(self) -> str:
        return f"{self.quantization}, experts={self.num_experts}, matrix={tuple(self.matrix_shape)}"


def statistics(model: nn.Module) -> list[torch.Tensor]:
    """Tensors that quantized linear layers hold besides their parameters.

    int8: the float32 scale per output row (`SCB`, on the weight until the first forward, then
    on the layer's state). nf4: the quantization state's absmax and code table (and nested
    statistics, were double quantization used). The int8 `CB` is the weight's own storage.
    """
    found = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(module, "state", None)
        for scb in (getattr(weight, "SCB", None), getattr(state, "SCB", None)):
            if isinstance(scb, torch.Tensor):
                found.append(scb)
        quant_state = weight.__dict__.get("quant_state") if isinstance(weight, torch.Tensor) else None
        while quant_state is not None:
            found += [t for t in (getattr(quant_state, k, None) for k in ("absmax", "code", "offset"))
                      if isinstance(t, torch.Tensor)]
            quant_state = getattr(quant_state, "state2", None)
    return found


def release_freed_memory() -> None:
    """Gives the C heap's free pages back to the operating system (glibc only; else nothing).

    Quantizing one matrix makes several float temporaries of its size; glibc keeps freed blocks of
    that size in its heap, and fragmentation makes the heap grow matrix after matrix, so that a
    stage's peak resident memory would be about twice its quantized weights. Trimming after each
    matrix keeps the peak at the weights plus one matrix's temporaries.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def _modules_transformers_skips(model: nn.Module) -> list[str]:
    """The modules `from_pretrained` leaves unquantized when no skip list is given: the LM head,
    tied weights, the module of the last parameter, and `_keep_in_fp32_modules`."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return list(set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or []))
