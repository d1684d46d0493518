"""Offline text: a corpus, a BPE tokenizer and a classification task from the stdlib.

Every Python installation carries its standard library's source, whose docstrings
are plain English prose. That makes an offline language setup that needs no
download (the text counterpart of scikit-learn's bundled digits):

- pretext corpus: the docstrings of the top-level standard-library modules (their
  source files parsed with :mod:`ast`, never imported), joined in file order;
- tokenizer: a byte-pair encoding learnt on that corpus (:func:`train_bpe`), in the
  original GPT's format (lower-cased, ``</w>`` marks the end of a word, files
  ``vocab.json`` + ``merges.txt``), so :class:`BPETokenizer` and Hugging Face's
  ``OpenAIGPTTokenizer`` read the same files;
- downstream task: which package (``asyncio``, ``email``, ``importlib``,
  ``logging``) a docstring paragraph comes from. Those packages are left out of the
  pretext corpus.

Everything is deterministic for a given Python version (the corpus text changes
between versions; :func:`corpus_fingerprint` records which one was used). The
original GPT BPE of the thesis (§7.1.1, V = 40,478) is read from local files by
:func:`load_openai_gpt_tokenizer`.
"""
import ast
import collections
import hashlib
import heapq
import json
import os
import re
import sysconfig
import unicodedata
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from bissl_jax.data.tokens import head_split

END_OF_WORD = "</w>"
UNK = "<unk>"
DOWNSTREAM_PACKAGES = ("asyncio", "email", "importlib", "logging")
_SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages",
                 "ensurepip", "tkinter", "__pycache__", "pydoc_data"}


# ------------------------------------------------------------------ text sources


def stdlib_dir() -> str:
  """The standard library's source directory of this interpreter."""
  return sysconfig.get_paths()["stdlib"]


def file_docstrings(path: str) -> List[str]:
  """Module, class and function docstrings of one source file, in source order."""
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
  except (SyntaxError, UnicodeDecodeError, ValueError):
    return []
  nodes = [n for n in ast.walk(tree)
           if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
  nodes.sort(key=lambda n: getattr(n, "lineno", 0))
  return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def package_files(package: str, root: Optional[str] = None) -> List[str]:
  """Sorted ``.py`` files of a stdlib package (tests excluded)."""
  base = os.path.join(root or stdlib_dir(), package)
  files = []
  for directory, subdirs, names in os.walk(base):
    subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
    files += [os.path.join(directory, n) for n in names if n.endswith(".py")]
  return sorted(files)


def pretext_text(max_chars: Optional[int] = None, root: Optional[str] = None) -> str:
  """Docstrings of the top-level stdlib modules, one paragraph per line, in file order."""
  root = root or stdlib_dir()
  lines, size = [], 0
  for name in sorted(os.listdir(root)):
    if not name.endswith(".py"):
      continue
    for doc in file_docstrings(os.path.join(root, name)):
      for paragraph in paragraphs(doc):
        lines.append(paragraph)
        size += len(paragraph) + 1
        if max_chars is not None and size >= max_chars:
          return "\n".join(lines)[:max_chars]
  if not lines:
    raise FileNotFoundError(f"No docstrings found under {root}; the offline text corpus "
                            "needs the interpreter's standard-library sources.")
  return "\n".join(lines)


def paragraphs(doc: str) -> List[str]:
  """Blank-line separated paragraphs of a docstring, whitespace collapsed."""
  return [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc) if p.strip()]


def corpus_fingerprint(text: str) -> str:
  """sha256 of a corpus, to record which text a run used."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------ BPE


def _is_punctuation(ch: str) -> bool:
  # BERT's definition, which the original GPT tokenizer uses before BPE.
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
  """Lower case, accents stripped, control characters dropped (as BERT's normalizer)."""
  text = unicodedata.normalize("NFD", text.lower())
  return "".join(" " if ch in "\t\n\r" else ch for ch in text
                 if unicodedata.category(ch) not in ("Mn", "Cc", "Cf") or ch in "\t\n\r")


def pre_tokenize(text: str) -> List[str]:
  """Words of normalised text: whitespace separates, each punctuation mark stands alone."""
  words, current = [], []
  for ch in normalize(text):
    if ch.isspace() or _is_punctuation(ch):
      if current:
        words.append("".join(current))
        current = []
      if not ch.isspace():
        words.append(ch)
    else:
      current.append(ch)
  if current:
    words.append("".join(current))
  return words


def _symbols(word: str) -> Tuple[str, ...]:
  return tuple(word[:-1]) + (word[-1] + END_OF_WORD,)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
  """Learns a BPE of at most ``vocab_size`` symbols (Sennrich et al., as the original GPT).

  Starts from every character (and character + ``</w>``) seen, then repeatedly
  merges the most frequent adjacent pair; ties go to the lexicographically
  smallest pair, so the result depends on the text alone.

  Returns:
    ``(vocab, merges)``: ``vocab`` maps symbols to ids (``<unk>`` = 0, then the
    characters sorted, then merges in order).
  """
  counts = collections.Counter(w for t in texts for w in pre_tokenize(t))
  words = [list(_symbols(w)) for w in sorted(counts)]
  freq = [counts[w] for w in sorted(counts)]
  base = sorted({s for w in words for s in w})
  vocab = {UNK: 0}
  for s in base:
    vocab[s] = len(vocab)
  if len(vocab) > vocab_size:
    raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(vocab)} base "
                     "symbols of this text; raise it.")
  pair_count = collections.Counter()
  pair_words = collections.defaultdict(set)
  for i, w in enumerate(words):
    for pair in zip(w, w[1:]):
      pair_count[pair] += freq[i]
      pair_words[pair].add(i)
  heap = [(-c, p) for p, c in pair_count.items()]
  heapq.heapify(heap)
  merges = []
  while len(vocab) < vocab_size and heap:
    negative, pair = heapq.heappop(heap)
    if pair_count.get(pair, 0) != -negative or negative == 0:
      continue  # stale entry
    merged = pair[0] + pair[1]
    merges.append(pair)
    if merged not in vocab:
      vocab[merged] = len(vocab)
    touched = set()  # pairs whose count changed
    for i in sorted(pair_words.pop(pair)):
      w = words[i]
      for old in zip(w, w[1:]):
        pair_count[old] -= freq[i]
        touched.add(old)
      out, j = [], 0
      while j < len(w):
        if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
          out.append(merged)
          j += 2
        else:
          out.append(w[j])
          j += 1
      words[i] = out
      for new in zip(out, out[1:]):
        pair_count[new] += freq[i]
        pair_words[new].add(i)
        touched.add(new)
    for p in sorted(touched):
      if pair_count[p] > 0:
        heapq.heappush(heap, (-pair_count[p], p))
      else:
        pair_count.pop(p, None)
  return vocab, merges


class BPETokenizer:
  """Encodes text with a BPE vocabulary in the original GPT's format.

  Args:
    vocab: symbol → id (``<unk>`` must be present).
    merges: the merge list in priority order.
  """

  def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]]):
    if UNK not in vocab:
      raise ValueError(f"The vocabulary has no {UNK!r} entry.")
    self.vocab = dict(vocab)
    self.merges = [tuple(m) for m in merges]
    self._ranks = {m: r for r, m in enumerate(self.merges)}
    self._cache: Dict[str, List[int]] = {}

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def _bpe(self, word: str) -> List[int]:
    if word in self._cache:
      return self._cache[word]
    symbols = list(_symbols(word))
    while len(symbols) > 1:
      pairs = [(self._ranks.get(p, float("inf")), k)
               for k, p in enumerate(zip(symbols, symbols[1:]))]
      rank, _ = min(pairs)
      if rank == float("inf"):
        break
      best = self.merges[int(rank)]
      out, j = [], 0
      while j < len(symbols):
        if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
          out.append(symbols[j] + symbols[j + 1])
          j += 2
        else:
          out.append(symbols[j])
          j += 1
      symbols = out
    unk = self.vocab[UNK]
    ids = [self.vocab.get(s, unk) for s in symbols]
    self._cache[word] = ids
    return ids

  def encode(self, text: str) -> List[int]:
    """Token ids of ``text`` (no special tokens)."""
    return [i for w in pre_tokenize(text) for i in self._bpe(w)]

  def save(self, directory: str) -> None:
    """Writes ``vocab.json`` and ``merges.txt`` (readable by ``OpenAIGPTTokenizer``)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(self.vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))

  @classmethod
  def load(cls, directory: str) -> "BPETokenizer":
    """Reads ``vocab.json`` and ``merges.txt`` from ``directory``."""
    vocab_file, merges_file = _vocab_files(directory)
    with open(vocab_file, encoding="utf-8") as f:
      vocab = json.load(f)
    with open(merges_file, encoding="utf-8") as f:
      merges = [tuple(line.split()) for line in f.read().splitlines()
                if line and not line.startswith("#version")]
    return cls(vocab, merges)


def _vocab_files(directory: str) -> Tuple[str, str]:
  files = (os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise FileNotFoundError(
        f"No BPE vocabulary in {directory!r} (missing {missing}). The original GPT's "
        "vocab.json and merges.txt come with Hugging Face's 'openai-gpt' model files; "
        "copy them there (nothing is downloaded at run time).")
  return files


class HFTokenizer:
  """``encode``/``vocab_size`` over a Hugging Face tokenizer (no special tokens added)."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer

  @property
  def vocab_size(self) -> int:
    return len(self._tokenizer.get_vocab())

  def encode(self, text: str) -> List[int]:
    return list(self._tokenizer.encode(text, add_special_tokens=False))


def load_openai_gpt_tokenizer(directory: str) -> HFTokenizer:
  """The original GPT BPE (``transformers.OpenAIGPTTokenizer``) from local vocab/merges files."""
  _vocab_files(directory)
  try:
    from transformers import OpenAIGPTTokenizer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("The original GPT tokenizer needs transformers: pip install "
                      "transformers (or use BPETokenizer.load on the same files).") from e
  return HFTokenizer(OpenAIGPTTokenizer.from_pretrained(directory, local_files_only=True))


# ------------------------------------------------------------------ downstream task


def package_paragraphs(packages: Sequence[str] = DOWNSTREAM_PACKAGES, *,
                       min_words: int = 5, root: Optional[str] = None
                       ) -> Tuple[List[str], np.ndarray]:
  """Distinct docstring paragraphs of each package with its package index as label."""
  texts, labels, seen = [], [], set()
  for label, package in enumerate(packages):
    files = package_files(package, root)
    if not files:
      raise FileNotFoundError(f"Standard-library package {package!r} not found under "
                              f"{root or stdlib_dir()}.")
    for path in files:
      for doc in file_docstrings(path):
        for p in paragraphs(doc):
          if len(p.split()) >= min_words and p not in seen:
            seen.add(p)
            texts.append(p)
            labels.append(label)
  return texts, np.asarray(labels, np.int32)


def _hash_order(texts: Sequence[str], indices) -> List[int]:
  key = lambda i: hashlib.sha1(texts[i].encode("utf-8")).hexdigest()
  return sorted(indices, key=key)


def package_task_splits(texts: Sequence[str], labels: np.ndarray, *,
                        test_fraction: float = 0.2, val_fraction: float = 0.2
                        ) -> Dict[str, np.ndarray]:
  """Deterministic, class-balanced train/validation/test indices.

  Each class is cut to the size of the smallest and ordered by the SHA-1 of its
  texts; its last ``test_fraction`` is test. The rest, merged in hash order, is
  split by the thesis's rule: the first ``1 − val_fraction`` trains, the remainder
  validates.
  """
  classes = np.unique(labels)
  size = min(int(np.sum(labels == c)) for c in classes)
  n_test = int(round(test_fraction * size))
  rest, test = [], []
  for c in classes:
    members = _hash_order(texts, np.flatnonzero(labels == c).tolist())[:size]
    rest += members[:size - n_test]
    test += members[size - n_test:]
  rest = _hash_order(texts, rest)
  train_idx, val_idx = head_split(len(rest), 1.0 - val_fraction)
  return {"train": np.asarray([rest[i] for i in train_idx], np.int64),
          "validation": np.asarray([rest[i] for i in val_idx], np.int64),
          "test": np.asarray(sorted(test), np.int64)}


def offline_text(*, vocab_size: int = 1024, context: int = 64,
                 max_chars: Optional[int] = 300_000, special_ids: Optional[dict] = None,
                 root: Optional[str] = None) -> dict:
  """The offline language setup: tokenizer, pretext chunks and the package task.

  Args:
    vocab_size: size V of the BPE learnt on the pretext corpus.
    context: k; pretext chunks have exactly k tokens, downstream inputs longer
      than k are dropped.
    max_chars: cap on the pretext corpus (None: every top-level module).
    special_ids: the model's ``GPT.special_ids`` (default: start = V, end = V + 1,
      the classification layout).
    root: the standard-library directory (default: this interpreter's).

  Returns:
    ``{'tokenizer', 'fingerprint', 'pretext': TokenDataset, 'downstream':
    {'train', 'validation', 'test'}: TokenDataset, 'classes': package names}``.
  """
  # Imported here: the formatting lives with the tasks, which import the model.
  from bissl_jax.data.tokens import TokenDataset, chunk_stream  # pylint: disable=import-outside-toplevel
  from bissl_jax.tasks.downstream.text import format_examples  # pylint: disable=import-outside-toplevel
  text = pretext_text(max_chars=max_chars, root=root)
  vocab, merges = train_bpe(text.splitlines(), vocab_size)
  tokenizer = BPETokenizer(vocab, merges)
  pretext = chunk_stream(tokenizer.encode(text), context, name="stdlib_docstrings")
  texts, labels = package_paragraphs(root=root)
  special_ids = special_ids or {"start": tokenizer.vocab_size, "end": tokenizer.vocab_size + 1}
  downstream = {}
  for split, idx in package_task_splits(texts, labels).items():
    tokens, kept = format_examples("classification", special_ids,
                                   [tokenizer.encode(texts[i]) for i in idx],
                                   context=context, length=context)
    downstream[split] = TokenDataset(tokens=tokens, labels=labels[idx][kept],
                                     num_classes=len(DOWNSTREAM_PACKAGES),
                                     name=f"stdlib_packages/{split}")
  return {"tokenizer": tokenizer, "fingerprint": corpus_fingerprint(text),
          "pretext": pretext, "downstream": downstream,
          "classes": DOWNSTREAM_PACKAGES}
