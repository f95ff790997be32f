"""Small random-initialised checkpoints of real architectures, built with transformers.

Tests, benchmarks and load tests all build their models here, the same way: a config of the real
architecture (shrunk), `from_config` with a fixed seed, `save_pretrained` (sharded when asked),
and a byte-level BPE tokenizer trained with `tokenizers` on a small generated corpus.
"""

from __future__ import annotations

import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
VOCAB_SIZE = 512

_WORDS = ("the a of to and in is was for on with as by at from that this it be are have not or "
          "an they which one you were all we her she there would their will when who him been has "
          "more if no out do so can what up said about other into than its time only could new "
          "them man some these then two first may any like now my such make over our even most "
          "me state after also made many did must before back see through way where get much go "
          "well your know should down work year because come people just say each those take day "
          "good how long three own us give great think city France Paris river mountain cloud "
          "stone garden music pipeline stage token model server engine quick brown fox jumps lazy "
          "dog über café naïve 東京 日本 😀").split()

# Shrunk configs of real architectures; every one has 6 blocks so that 1, 2 and 3 stages split it.
ARCHITECTURES: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
    "gpt2": dict(n_embd=64, n_layer=6, n_head=4, n_positions=512),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    # A short window so that tests cross it: sliding-window masks are exercised, not just allowed.
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, sliding_window=24),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                     max_position_embeddings=512, rotary_pct=0.5),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, pad_token_id=None),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=512),
}

# The throughput and memory issues' reference model: a 125M Llama.
LLAMA_125M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                  tie_word_embeddings=False)


def corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences used to train the tokenizer (and as prompts)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) + "." for _ in range(num_lines)]


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus()`, with `<|endoftext|>` as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def build_checkpoint(arch: str, path: str, *, seed: int = 0, max_shard_size: str | None = None,
                     dtype: torch.dtype = torch.float32, tokenizer_vocab: int = VOCAB_SIZE,
                     **overrides) -> str:
    """Writes a random-initialised checkpoint of `arch` with its tokenizer to `path`.

    Args:
        arch: a key of `ARCHITECTURES` (the transformers `model_type`), or any model_type when
            `overrides` give the whole config.
        path: output directory (created).
        seed: torch seed for the weights.
        max_shard_size: shard the safetensors (e.g. "100KB") to exercise the index.
        dtype: dtype of the saved weights.
        tokenizer_vocab: size of the trained tokenizer's vocabulary.
        **overrides: config fields on top of the architecture's.

    Returns:
        `path`.
    """
    tokenizer = build_tokenizer(tokenizer_vocab)
    vocab_size = overrides.get("vocab_size", len(tokenizer))
    if vocab_size > len(tokenizer):
        # Every id the model can emit must decode: fill the rest of a large vocabulary.
        tokenizer.add_tokens([f"<filler_{i}>" for i in range(len(tokenizer), vocab_size)])
    eos = tokenizer.convert_tokens_to_ids(EOS)
    fields = dict(ARCHITECTURES.get(arch, {}))
    fields.update(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, initializer_range=0.1)
    fields.update(overrides)
    config = AutoConfig.for_model(arch, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    os.makedirs(path, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


def build_llama_125m(path: str, *, max_shard_size: str | None = "200MB") -> str:
    """The 125M Llama of the throughput and memory issues (float32, random weights, sharded)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    return build_checkpoint("llama", path, max_shard_size=max_shard_size, tokenizer_vocab=VOCAB_SIZE,
                            **{**LLAMA_125M, "initializer_range": 0.02})
