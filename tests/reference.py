"""transformers' own greedy output, the reference every test of the data path compares with."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def greedy_text(model_dir: str, prompt: str | list[int], max_tokens: int, *, exact_length: bool = True,
                adapter: str | None = None) -> str:
    """The text `generate()` continues `prompt` with, greedily, in one process.

    Args:
        model_dir: checkpoint directory.
        prompt: text (tokenized with special tokens, as the server does) or token ids.
        max_tokens: new tokens.
        exact_length: EOS held off until `max_tokens` (as the server's `min_tokens`).
        adapter: a PEFT LoRA adapter directory: the model is peft's `PeftModel` with it.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter)
    out = model.eval().generate(
        torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens if exact_length else 0,
        do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)
