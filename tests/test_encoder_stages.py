"""Encoder stages: a BERT sentence encoder split into layer ranges gives the whole model's embeddings.

The reference is computed in this process with transformers alone, as sentence-transformers does
it (AutoModel, mean over the attention mask, L2 normalisation), without importing it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, GPT2Config

import stages.encoder
from stages.encoder import EncoderConfig, EncoderStage, is_encoder, read_encoder_config

torch.set_num_threads(1)  # the machine is shared: tests stay on one core

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A monkey is playing drums.",
    "The new movie is awesome and everyone in the theatre loved every single minute of it.",
    "Hi",
]
# Layer boundaries of 1, 2 and 3 stages over MiniLM's 6 layers.
SPLITS = {1: (0, 6), 2: (0, 3, 6), 3: (0, 2, 4, 6)}


def run_stages(model_dir: str, bounds: tuple[int, ...], input_ids, attention_mask) -> torch.Tensor:
    """Builds the stages of `bounds` and chains them, as a pipeline would."""
    out = input_ids
    for start, end in zip(bounds, bounds[1:]):
        out = EncoderStage(model_dir, start, end)(out, attention_mask)
    return out


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


@pytest.fixture(scope="module")
def minilm_batch(minilm):
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@pytest.fixture(scope="module")
def minilm_reference(minilm, minilm_batch) -> torch.Tensor:
    input_ids, attention_mask = minilm_batch
    model = AutoModel.from_pretrained(minilm).eval()
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(mean_pool(hidden, attention_mask), p=2, dim=1)


def test_minilm_config(minilm):
    assert read_encoder_config(minilm) == EncoderConfig(pooling="mean", normalize=True, max_seq_length=256,
                                                        hidden_size=384, num_layers=6)


@pytest.mark.parametrize("num_stages", sorted(SPLITS))
def test_minilm_split_matches_whole_model(minilm, minilm_batch, minilm_reference, num_stages):
    input_ids, attention_mask = minilm_batch
    assert attention_mask.sum(1).unique().numel() >= 4  # 3 to 19 tokens: most rows are padded
    embeddings = run_stages(minilm, SPLITS[num_stages], input_ids, attention_mask)
    assert embeddings.shape == (len(SENTENCES), 384) and embeddings.dtype == torch.float32
    cosines = F.cosine_similarity(embeddings, minilm_reference, dim=1)
    assert cosines.min() >= 0.9999, cosines
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(SENTENCES)))


def test_minilm_similarity_ranks(minilm, minilm_batch):
    embeddings = run_stages(minilm, SPLITS[3], *minilm_batch)
    similarity = embeddings @ embeddings.T
    eating, bread, drums = 0, 1, 2
    assert similarity[eating, bread] > 0.6 > similarity[eating, drums]
    assert similarity[bread, eating] > similarity[bread, drums]


def test_minilm_padding_does_not_change_a_row(minilm, minilm_batch):
    input_ids, attention_mask = minilm_batch
    batched = run_stages(minilm, SPLITS[2], input_ids, attention_mask)
    length = int(attention_mask[-1].sum())  # "Hi": the shortest row, the most padded
    alone = run_stages(minilm, SPLITS[2], input_ids[-1:, :length], attention_mask[-1:, :length])
    assert F.cosine_similarity(batched[-1:], alone).item() >= 0.9999


def tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A random-initialised BertModel checkpoint, without sentence-transformers files."""
    path = str(tmp_path_factory.mktemp("tiny-bert"))
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(path)
    return path


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 99, (3, 10), generator=generator)
    attention_mask = torch.zeros(3, 10, dtype=torch.long)
    for row, length in enumerate((10, 6, 2)):
        attention_mask[row, :length] = 1
    return input_ids * attention_mask, attention_mask  # pad id 0


def whole_model_hidden(model_dir: str, input_ids, attention_mask) -> torch.Tensor:
    model = BertModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def test_plain_bert_defaults(tiny_bert):
    assert read_encoder_config(tiny_bert) == EncoderConfig(pooling="mean", normalize=False, max_seq_length=64,
                                                           hidden_size=32, num_layers=4)


def test_plain_bert_two_stages_match_whole_model(tiny_bert):
    input_ids, attention_mask = tiny_batch()
    expected = mean_pool(whole_model_hidden(tiny_bert, input_ids, attention_mask), attention_mask)
    embeddings = run_stages(tiny_bert, (0, 2, 4), input_ids, attention_mask)
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)


def test_prefixed_checkpoint(tmp_path):
    """A masked-LM checkpoint stores the encoder as `bert.*` (plus its head): the same stages load it."""
    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path)
    input_ids, attention_mask = tiny_batch()
    expected = mean_pool(whole_model_hidden(str(tmp_path), input_ids, attention_mask), attention_mask)
    torch.testing.assert_close(run_stages(str(tmp_path), (0, 1, 4), input_ids, attention_mask), expected,
                               rtol=1e-5, atol=1e-5)


def test_cls_pooling_and_normalize_from_metadata(tiny_bert, tmp_path):
    for name in os.listdir(tiny_bert):
        os.symlink(os.path.join(tiny_bert, name), tmp_path / name)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    assert read_encoder_config(str(tmp_path)) == EncoderConfig(pooling="cls", normalize=True, max_seq_length=8,
                                                               hidden_size=32, num_layers=4)
    input_ids, attention_mask = tiny_batch()
    input_ids, attention_mask = input_ids[:, :8], attention_mask[:, :8]
    expected = F.normalize(whole_model_hidden(tiny_bert, input_ids, attention_mask)[:, 0], dim=1)
    torch.testing.assert_close(run_stages(str(tmp_path), (0, 3, 4), input_ids, attention_mask), expected,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_length"):
        EncoderStage(str(tmp_path), 0, 4)(*tiny_batch())  # 10 tokens: truncating is the tokenizer's job


def test_unsupported_pooling_is_refused(tiny_bert, tmp_path):
    for name in os.listdir(tiny_bert):
        os.symlink(os.path.join(tiny_bert, name), tmp_path / name)
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling"):
        read_encoder_config(str(tmp_path))


def test_each_stage_reads_only_its_own_tensors(tiny_bert, monkeypatch):
    read: list[set[str]] = []

    def recording(model_dir, names, files, **kwargs):
        read.append(set(names.values()))
        return real(model_dir, names, files, **kwargs)

    real = stages.encoder.iter_tensors
    monkeypatch.setattr(stages.encoder, "iter_tensors", recording)
    first, second = EncoderStage(tiny_bert, 0, 2), EncoderStage(tiny_bert, 2, 4)

    assert {name.split(".")[0] for name in read[0]} == {"embeddings", "encoder"}
    assert {name.split(".")[2] for name in read[0] if name.startswith("encoder.")} == {"0", "1"}
    assert all(name.startswith("encoder.") for name in read[1])
    assert {name.split(".")[2] for name in read[1]} == {"2", "3"}
    assert first.embeddings is not None and second.embeddings is None
    assert not any("embeddings" in name for name, _ in second.named_parameters())
    # Together the stages hold the whole model but its pooler, which sentence encoders do not use.
    whole = BertModel.from_pretrained(tiny_bert)
    tensors = [*whole.named_parameters(), *whole.named_buffers()]
    whole_bytes = sum(t.numel() * t.element_size() for name, t in tensors if not name.startswith("pooler."))
    assert first.weight_bytes() + second.weight_bytes() == whole_bytes
    assert first.num_layers == second.num_layers == 4


def test_layer_range_is_checked(tiny_bert):
    for start, end in ((0, 0), (2, 1), (0, 5), (-1, 2)):
        with pytest.raises(ValueError, match="layer range"):
            EncoderStage(tiny_bert, start, end)


def test_is_encoder():
    assert is_encoder(BertConfig())
    assert is_encoder(BertConfig(architectures=["BertForMaskedLM"]))
    assert not is_encoder(BertConfig(is_decoder=True))
    assert not is_encoder(BertConfig(architectures=["BertLMHeadModel"]))
    assert not is_encoder(GPT2Config())
