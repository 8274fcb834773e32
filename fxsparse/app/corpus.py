"""Pre-training text: find text files, tokenise them once (cached), split held-out by document, pack.

The default corpus is the reStructuredText source of the Python documentation that Debian's
``python3.11-doc`` package installs (about 500 files, 11 MB of English technical prose). Any text files
or folders can be used instead.

Token ids are cached under ``<fxsparse cache>/corpus/`` in a file keyed by a hash of the files' names
and contents and of the tokenizer's vocabulary, so a corpus is tokenised once per tokenizer.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> for i in range(4):
...     _ = (root / f"doc{i}.txt").write_text(f"document {i} " * 50)
>>> corpus = load_corpus([root], ByteTokenizer(), cache=False)
>>> train, val = split_documents(corpus, val_fraction=0.25, seed=0)
>>> len(train) + len(val) == corpus.num_tokens, len(val) >= 0.25 * corpus.num_tokens
(True, True)
>>> pack_sequences(train, seq_len=32).shape[1]
32
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxsparse.app.models import cache_dir

__all__ = [
    "DEFAULT_CORPUS_DIR",
    "TEXT_SUFFIXES",
    "ByteTokenizer",
    "Corpus",
    "default_corpus_files",
    "find_text_files",
    "tokenizer_key",
    "load_corpus",
    "split_documents",
    "pack_sequences",
]

# Where Debian's python3.11-doc package puts the documentation sources; a system location, not ours.
DEFAULT_CORPUS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text")
_CACHE_VERSION = "1"


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 plus an end-of-document id 256: a stand-in that needs no files.

    >>> tok = ByteTokenizer()
    >>> tok.encode_batch(["hi"]), len(tok), tok.eos_token_id
    ([[104, 105]], 257, 256)
    """

    eos_token_id = 256

    def __len__(self) -> int:
        return 257

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]


@dataclass(frozen=True)
class Corpus:
    """Token ids of a list of documents: ``tokens[offsets[i]:offsets[i + 1]]`` is document ``i``.

    Every document ends with the tokenizer's end-of-sequence id, so packed sequences see boundaries.
    """

    files: tuple[str, ...]
    tokens: np.ndarray  # int32, all documents back to back
    offsets: np.ndarray  # int64, num_documents + 1
    key: str  # hash of file names + contents + tokenizer

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]


def default_corpus_files() -> list[Path]:
    """The Python documentation sources, or a ``ValueError`` that says how to install them."""
    files = sorted(DEFAULT_CORPUS_DIR.rglob("*.rst.txt")) if DEFAULT_CORPUS_DIR.is_dir() else []
    if not files:
        raise ValueError(
            f"no --data given and the default corpus is not installed ({DEFAULT_CORPUS_DIR} has no *.rst.txt "
            "files). Install it with `apt-get update && apt-get install -y python3.11-doc`, or pass text "
            "files or folders with --data PATH."
        )
    return files


def find_text_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named in ``paths`` plus every text file (``TEXT_SUFFIXES``) under the folders in it, sorted.

    Raises ``ValueError`` naming a path that does not exist or a folder that holds no text file.
    """
    if not paths:
        raise ValueError("no data paths given")
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            inside = [p.resolve() for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES)]
            if not inside:
                raise ValueError(f"data folder {str(raw)!r} holds no text file ending in {TEXT_SUFFIXES}")
            found.update(inside)
        else:
            raise ValueError(f"data path {str(raw)!r} does not exist")
    return sorted(found)


def tokenizer_key(tokenizer: Any) -> str:
    """A short hash that changes when the tokenizer's vocabulary (and so its ids) changes."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(str(len(tokenizer)).encode())
    if hasattr(tokenizer, "get_vocab"):
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            digest.update(f"{index}\t{token}\n".encode())
    digest.update(str(getattr(tokenizer, "eos_token_id", None)).encode())
    return digest.hexdigest()[:16]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts)
    # verbose=False: documents are longer than the tokenizer's model_max_length on purpose (we pack them)
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _corpus_key(files: Sequence[Path], contents: Sequence[bytes], tokenizer: Any) -> str:
    digest = hashlib.sha256(f"fxsparse-corpus-v{_CACHE_VERSION}\n{tokenizer_key(tokenizer)}\n".encode())
    for path, content in zip(files, contents, strict=True):
        # base names, not full paths: the same files in another folder hit the same cache entry
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()[:24]


def load_corpus(
    paths: Sequence[str | Path] | None, tokenizer: Any, cache: bool = True, batch_documents: int = 64
) -> Corpus:
    """Tokenise the text files in ``paths`` (default: :func:`default_corpus_files`), one document per file.

    With ``cache=True`` the ids are stored under the fxsparse cache folder and read back on later calls
    with the same files (by content) and the same tokenizer.
    """
    files = find_text_files(paths) if paths else default_corpus_files()
    contents = [path.read_bytes() for path in files]
    key = _corpus_key(files, contents, tokenizer)
    names = tuple(str(path) for path in files)
    cache_file = cache_dir() / "corpus" / f"{key}.npz" if cache else None
    if cache_file is not None and cache_file.exists():
        try:
            with np.load(cache_file) as stored:
                return Corpus(names, stored["tokens"], stored["offsets"], key)
        except (OSError, ValueError, KeyError):
            pass  # a corrupt entry is a miss: tokenise again and overwrite it
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id to separate documents")
    documents: list[list[int]] = []
    for start in range(0, len(contents), batch_documents):
        texts = [c.decode("utf-8", errors="replace") for c in contents[start : start + batch_documents]]
        documents.extend(ids + [eos] for ids in _encode(tokenizer, texts))
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter((t for d in documents for t in d), dtype=np.int32, count=int(offsets[-1]))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".npz.part")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, tokens=tokens, offsets=offsets)
        os.replace(tmp, cache_file)  # atomic: a concurrent reader never sees half a file
    return Corpus(names, tokens, offsets, key)


def split_documents(corpus: Corpus, val_fraction: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids): whole documents, drawn in a seeded order until ``val_fraction`` of tokens.

    No document is split between the two, so the held-out text is text the model never trained on.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if corpus.num_documents < 2:
        raise ValueError(f"need at least 2 documents for a held-out split, the corpus has {corpus.num_documents}")
    order = np.random.default_rng(seed).permutation(corpus.num_documents)
    target = val_fraction * corpus.num_tokens
    val_docs: list[int] = []
    val_tokens = 0
    for index in order[:-1]:  # the last one stays in training whatever happens
        if val_tokens >= target:
            break
        val_docs.append(int(index))
        val_tokens += len(corpus.document(int(index)))
    val_set = set(val_docs)
    train_docs = [i for i in range(corpus.num_documents) if i not in val_set]

    def _join(indices: Sequence[int]) -> np.ndarray:
        return np.concatenate([corpus.document(i) for i in sorted(indices)])

    return _join(train_docs), _join(val_docs)


def pack_sequences(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    """Cut ``ids`` into ``len(ids) // seq_len`` rows of ``seq_len`` tokens (int64); the tail is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    rows = len(ids) // seq_len
    if rows == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one sequence of seq_len={seq_len}")
    return torch.from_numpy(np.asarray(ids[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len))
