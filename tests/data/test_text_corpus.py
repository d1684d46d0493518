"""Offline stdlib corpus, BPE tokenizer (against OpenAIGPTTokenizer) and token datasets."""
import numpy as np
import pytest

from bissl_jax.data import text_corpus as tc
from bissl_jax.data.tokens import TokenDataset, chunk_stream, head_split

TEXT = ("The lower level solves the pretext task. The upper level solves the downstream "
        "task, lowering its loss! Lowest losses: (lower, lowest) -- newer, newest; "
        "wider_wide 42 times.")


def test_pre_tokenize_like_bert():
  assert tc.pre_tokenize("Café, x_y (2x)!") == ["cafe", ",", "x", "_", "y", "(", "2x", ")", "!"]


def test_bpe_learns_frequent_pairs_deterministically():
  vocab, merges = tc.train_bpe(["low lower lowest low low"], vocab_size=40)
  assert merges[0] == ("l", "o") and merges[1] == ("lo", "w</w>")  # 'lo' ×5, then 'low</w>' ×3
  assert (vocab, merges) == tc.train_bpe(["low lower lowest low low"], vocab_size=40)
  tok = tc.BPETokenizer(vocab, merges)
  assert tok.encode("low") == [vocab["low</w>"]]
  assert tok.encode("zz") == [0, 0]  # unknown characters → <unk>
  with pytest.raises(ValueError, match="base symbols"):
    tc.train_bpe([TEXT], vocab_size=5)


def test_bpe_matches_openai_gpt_tokenizer(tmp_path):
  pytest.importorskip("transformers")
  vocab, merges = tc.train_bpe([TEXT], vocab_size=120)
  tok = tc.BPETokenizer(vocab, merges)
  tok.save(str(tmp_path))
  reloaded = tc.BPETokenizer.load(str(tmp_path))
  hf = tc.load_openai_gpt_tokenizer(str(tmp_path))
  assert hf.vocab_size == tok.vocab_size == len(vocab)
  for text in (TEXT, "Newest lowering of the wider task.", "unseen words: quixotic jazz"):
    assert reloaded.encode(text) == hf.encode(text) == tok.encode(text)


def test_missing_vocabulary_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    tc.BPETokenizer.load(str(tmp_path))


def test_stdlib_sources_and_package_task():
  text = tc.pretext_text(max_chars=20_000)
  assert len(text) == 20_000 and text == tc.pretext_text(max_chars=20_000)
  texts, labels = tc.package_paragraphs()
  assert set(np.unique(labels)) == {0, 1, 2, 3}
  assert not any(t in text for t in texts[:50])  # the task's packages are not pretext text
  splits = tc.package_task_splits(texts, labels)
  sets = {k: set(v.tolist()) for k, v in splits.items()}
  assert not (sets["train"] & sets["test"] or sets["train"] & sets["validation"]
              or sets["validation"] & sets["test"])
  np.testing.assert_array_equal(splits["test"], tc.package_task_splits(texts, labels)["test"])
  counts = np.bincount(labels[splits["test"]])
  assert counts.min() == counts.max()  # balanced test split


def test_offline_text_end_to_end():
  data = tc.offline_text(vocab_size=300, context=32, max_chars=30_000)
  assert data["tokenizer"].vocab_size == 300
  pretext = data["pretext"]
  assert pretext.tokens.shape[1] == 32 and (pretext.tokens >= 0).all()
  assert pretext.tokens.max() < 300
  for split in ("train", "validation", "test"):
    ds = data["downstream"][split]
    assert ds.tokens.shape[1] == 32 and ds.num_classes == 4
    assert (ds.tokens[:, 0] == 300).all()  # start token = V
  again = tc.offline_text(vocab_size=300, context=32, max_chars=30_000)
  np.testing.assert_array_equal(again["downstream"]["train"].tokens,
                                data["downstream"]["train"].tokens)
  assert again["fingerprint"] == data["fingerprint"]


def test_token_dataset_helpers():
  ds = chunk_stream(np.arange(25), 8)
  assert ds.tokens.shape == (3, 8) and ds.tokens[2, 0] == 16
  assert ds.batch(np.array([[2, 0]]))["tokens"].shape == (1, 2, 8)
  train, val = head_split(10)
  assert train.tolist() == list(range(8)) and val.tolist() == [8, 9]
  with pytest.raises(ValueError, match="out of range"):
    TokenDataset(tokens=np.zeros((2, 3), np.int32), labels=np.array([0, 5]), num_classes=2)
  with pytest.raises(ValueError, match="holds no chunk"):
    chunk_stream(np.arange(3), 8)
