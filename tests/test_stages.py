"""Stages without Ray: N chained stages must reproduce transformers token for token."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import Stage
from stages.loading import read_rows, weight_map
from stages.packed import PackedLinear
from tests.checkpoints import ARCHITECTURES
from tests.recording import record_reads

PROMPT = "the quick brown fox jumps over the lazy dog in the city of Paris"
SPLITS = {1: [(0, 6)], 2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]}


def reference(model_dir: str, prompt_ids: list[int], num_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                         do_sample=False)
    return out[0, len(prompt_ids):].tolist()


BLOCK = 4  # tokens per KV block in these tests: small, so that contexts span many blocks


def contiguous(slot: int):
    """A sequence's blocks in one run: 16 blocks from `slot * 16`."""
    return lambda length: [slot * 16 + i for i in range(-(-length // BLOCK))]


def interleaved(seq: int, num_seqs: int = 3):
    """A sequence's blocks scattered among the others' (every block its own run)."""
    return lambda length: [seq + num_seqs * i for i in range(-(-length // BLOCK))]


def step(stages: list[Stage], inputs, tables, starts, num_new) -> torch.Tensor:
    """One batched step through the chained stages; returns the last stage's logits."""
    for stage in stages:
        inputs = stage(inputs, tables, starts, num_new)
    return inputs


def greedy(stages: list[Stage], prompt_ids: list[int], num_tokens: int, blocks=contiguous(0)) -> list[int]:
    logits = step(stages, torch.tensor([prompt_ids]), [blocks(len(prompt_ids))], [0], [len(prompt_ids)])
    out = [int(logits[0].argmax())]
    for _ in range(num_tokens - 1):
        length = len(prompt_ids) + len(out)
        logits = step(stages, torch.tensor([[out[-1]]]), [blocks(length)], [length - 1], [1])
        out.append(int(logits[0].argmax()))
    return out


@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_chained_stages_match_transformers(checkpoint, arch, num_stages, monkeypatch):
    model_dir = checkpoint(arch)
    prompt_ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids
    # 32 new tokens cross Mistral's 24-token sliding window.
    expected = reference(model_dir, prompt_ids, 32)
    stages = [Stage(model_dir, start, end, num_blocks=64, block_size=BLOCK) for start, end in SPLITS[num_stages]]
    assert greedy(stages, prompt_ids, 32) == expected  # short rows: gathered into one batch
    monkeypatch.setattr("stages.kv_cache.GATHER_MAX_TOKENS", 0)  # every row read in place, by runs
    assert greedy(stages, prompt_ids, 32) == expected
    assert greedy(stages, prompt_ids, 32, interleaved(1)) == expected  # each block its own run: copied
    monkeypatch.setattr("stages.kv_cache.MAX_RUNS", 1000)  # read run by run
    assert greedy(stages, prompt_ids, 32, interleaved(1)) == expected
    monkeypatch.setattr("stages.kv_cache.SCORES_TILE_BYTES", 1)  # the scores a query at a time
    assert greedy(stages, prompt_ids, 32, interleaved(1)) == expected


@pytest.mark.parametrize("gather_max_tokens", [48, 0])
@pytest.mark.parametrize("num_stages", [2, 3])
def test_batched_rows_of_different_lengths_match_each_alone(checkpoint, num_stages, gather_max_tokens, monkeypatch):
    """Sequences join and leave mid-generation; each gets exactly what it gets alone."""
    monkeypatch.setattr("stages.kv_cache.GATHER_MAX_TOKENS", gather_max_tokens)
    model_dir = checkpoint("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(p).input_ids for p in
               ("the city", "a quick brown fox jumps over the lazy dog", "music of the river and stone garden at night")]
    alone = [reference(model_dir, p, 12) for p in prompts]
    stages = [Stage(model_dir, start, end, num_blocks=64, block_size=BLOCK) for start, end in SPLITS[num_stages]]
    # slot, prompt, tokens so far; sequence 0 starts alone, 1 and 2 join at steps 3 and 5
    # (in one padded prefill batch with 0's decode), and 0 leaves after 12 tokens.
    running: dict[int, list[int]] = {}
    tables = {0: interleaved(0), 1: contiguous(2), 2: interleaved(2)}
    outputs = {i: [] for i in range(3)}
    joins = {0: [0], 3: [1], 5: [2]}
    for t in range(20):
        batch = []
        for i in joins.get(t, []):
            batch.append((i, prompts[i], 0))
        for i in list(running):
            if len(outputs[i]) < 12:
                batch.append((i, [outputs[i][-1]], len(prompts[i]) + len(outputs[i]) - 1))
        if not batch:
            continue
        width = max(len(tokens) for _, tokens, _ in batch)
        inputs = torch.tensor([tokens + [0] * (width - len(tokens)) for _, tokens, _ in batch])
        logits = step(stages, inputs, [tables[i](s + len(tokens)) for i, tokens, s in batch],
                      [s for _, _, s in batch], [len(tokens) for _, tokens, _ in batch])
        for row, (i, _, _) in enumerate(batch):
            outputs[i].append(int(logits[row].argmax()))
            running[i] = outputs[i]
    assert [outputs[i] for i in range(3)] == alone


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_packed_steps_of_decode_rows_and_prompt_chunks_match_transformers(checkpoint, arch):
    """A step packs its rows' tokens into one row (a decode row next to a prompt chunk costs one
    token, not the chunk's width): sequence 0 decodes while sequence 1's prompt arrives in two
    chunks, then both decode, every step packed; each gets what it gets alone."""
    model_dir = checkpoint(arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(PROMPT).input_ids, tokenizer("music of the river and stone garden at night").input_ids]
    expected = [reference(model_dir, p, 16) for p in prompts]
    stages = [Stage(model_dir, start, end, num_blocks=64, block_size=BLOCK) for start, end in SPLITS[2]]
    tables, out = [interleaved(0, 2), contiguous(2)], [[], []]
    logits = step(stages, torch.tensor([prompts[0]]), [tables[0](len(prompts[0]))], [0], [len(prompts[0])])
    out[0].append(int(logits[0].argmax()))
    half = len(prompts[1]) // 2
    for a, b in ((0, half), (half, len(prompts[1]))):
        at = len(prompts[0]) + len(out[0]) - 1
        logits = step(stages, torch.tensor([[out[0][-1]] + prompts[1][a:b]]), [tables[0](at + 1), tables[1](b)],
                      [at, a], [1, b - a])
        assert logits.shape[0] == 2
        out[0].append(int(logits[0].argmax()))
    out[1].append(int(logits[1].argmax()))
    while len(out[1]) < 16:
        rows = [i for i in (0, 1) if len(out[i]) < 16]
        at = [len(prompts[i]) + len(out[i]) - 1 for i in rows]
        logits = step(stages, torch.tensor([[out[i][-1] for i in rows]]), [tables[i](a + 1) for i, a in zip(rows, at)],
                      at, [1] * len(rows))
        for row, i in enumerate(rows):
            out[i].append(int(logits[row].argmax()))
    assert out == expected


def test_a_warmed_up_stage_answers_as_before(checkpoint):
    """`Stage.warm_up` runs the largest steps on blocks no sequence holds yet: what it leaves in
    them is never read (a sequence writes each position before attending to it)."""
    model_dir = checkpoint("llama")
    prompt_ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids
    stages = [Stage(model_dir, start, end, num_blocks=64, block_size=BLOCK) for start, end in SPLITS[2]]
    for stage in stages:
        stage.warm_up(step_tokens=96, max_rows=8)
    assert greedy(stages, prompt_ids, 12, interleaved(0, 2)) == reference(model_dir, prompt_ids, 12)


def test_stage_reads_only_its_own_tensors(checkpoint, monkeypatch):
    model_dir = checkpoint("llama", max_shard_size="100KB")
    files = weight_map(model_dir)
    opened = record_reads(monkeypatch)
    stage = Stage(model_dir, 2, 4)
    read = [key for keys in opened.values() for key in keys]
    assert read and all(key.startswith(("model.layers.2.", "model.layers.3.")) for key in read)
    own_files = {files[key] for key in read}
    assert set(opened) == own_files  # never a file without one of its tensors
    assert stage.embed is None and stage.head is None
    assert stage.weight_bytes() == sum(t.numel() * t.element_size() for t in [*stage.parameters(), *stage.buffers()])


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])  # tied embeddings
def test_tied_head_on_the_last_stage(checkpoint, arch):
    model_dir = checkpoint(arch)
    first, last = Stage(model_dir, 0, 3), Stage(model_dir, 3, 6)
    hidden = torch.randn(4, first.embed.weight.shape[1])
    # The last stage's head may hold the matrix in oneDNN's layout (stages.packed): compare products.
    torch.testing.assert_close(last.head(hidden), hidden @ first.embed.weight.T, rtol=1e-5, atol=1e-5)
    alone = Stage(model_dir, 0, 6)
    assert alone.head.weight is alone.embed.weight  # one copy when a stage holds both


def test_bad_ranges_are_refused(checkpoint):
    model_dir = checkpoint("llama")
    for start, end in ((0, 0), (3, 2), (0, 7), (-1, 2)):
        with pytest.raises(ValueError, match="block range"):
            Stage(model_dir, start, end)


def test_compute_packages_do_not_import_ray():
    code = "import sys, stages, placement, stages.stage; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_packed_linear_computes_what_linear_does():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 50)
    x = torch.randn(3, 5, 64)
    whole = PackedLinear.from_linear(linear)
    by_rows = PackedLinear(linear.weight.split(16), linear.bias)  # 4 blocks of rows, the last short
    assert (whole.out_features, by_rows.out_features, len(by_rows.bounds)) == (50, 50, 5)
    with torch.inference_mode():
        for packed in (whole, by_rows):
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_read_rows_reads_what_safetensors_stores(checkpoint):
    model_dir = checkpoint("llama")
    files = weight_map(model_dir)
    name = next(n for n in files if n.endswith("mlp.up_proj.weight"))
    path = os.path.join(model_dir, files[name])
    with safe_open(path, framework="pt") as f:
        stored = f.get_tensor(name)
    assert torch.equal(read_rows(path, name, 3, 7), stored[3:7])


def test_float_stages_pack_their_linear_layers_and_quantized_ones_do_not(checkpoint, monkeypatch):
    model_dir = checkpoint("llama")
    monkeypatch.setattr("stages.stage.PACK_BLOCK_BYTES", 4096)  # the head is read by blocks of rows
    last = Stage(model_dir, 3, 6)
    assert isinstance(last.head, PackedLinear) and len(last.head.bounds) > 2
    assert isinstance(last.blocks[0].mlp.up_proj, PackedLinear)
    nf4 = Stage(model_dir, 3, 6, quantization="nf4")
    assert type(nf4.head) is torch.nn.Linear
    # the packed stage computes what the unpacked one does
    hidden = torch.randn(1, 4, last.config.hidden_size)
    args = ([[0]], [0], [4])
    monkeypatch.setattr("stages.stage.can_pack", lambda device, dtype: False)
    plain = Stage(model_dir, 3, 6)
    assert type(plain.head) is torch.nn.Linear
    torch.testing.assert_close(last(hidden, *args), plain(hidden, *args), rtol=1e-4, atol=1e-4)


def test_bfloat16_stages_match_transformers_in_bfloat16(checkpoint, monkeypatch):
    """On the CPU a bfloat16 stage runs packed layers too (where oneDNN supports bfloat16), and
    reads a context of several runs of blocks with the fused kernel in bfloat16."""
    model_dir = checkpoint("llama")
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    stages = [Stage(model_dir, start, end, dtype="bfloat16") for start, end in SPLITS[2]]
    assert greedy(stages, ids, 12) == expected[0, len(ids):].tolist()
    monkeypatch.setattr("stages.kv_cache.GATHER_MAX_TOKENS", 0)
    monkeypatch.setattr("stages.kv_cache.MAX_RUNS", 1000)  # every block its own run, read run by run
    assert greedy(stages, ids, 12, interleaved(1)) == expected[0, len(ids):].tolist()
