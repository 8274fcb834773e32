"""Pre-training text: find text files, tokenise them once (cached), split held-out by document, pack.

Two corpora are built in, chosen by name with ``--data``:

- ``stdlib``: the ``.py`` sources (code, comments and docstrings) of the running interpreter's standard
  library (``sysconfig.get_paths()["stdlib"]``; tests, ``site-packages`` and the ``encodings`` tables left
  out; about 700 files, 11 MB on CPython 3.11), sorted by path and capped at :data:`STDLIB_MAX_BYTES`.
  It is on every machine that runs fxsparse, so it needs nothing installed.
- ``debian-docs``: the reStructuredText source of the Python documentation that Debian's
  ``python3.11-doc`` package installs (about 500 files, 11 MB of English technical prose).

With no ``--data``, ``debian-docs`` is used where it is installed and ``stdlib`` otherwise; any text files
or folders can be given instead. Each file is one document.

Token ids are cached under ``<fxsparse cache>/corpus/`` in a file keyed by a hash of the files' names
and contents and of the tokenizer's vocabulary, so a corpus is tokenised once per tokenizer. An entry
that cannot be read back whole (truncated, corrupt, foreign) is a miss: it is rebuilt with one warning.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> for i in range(4):
...     _ = (root / f"doc{i}.txt").write_text(f"document {i} " * 50)
>>> corpus = load_corpus([root], ByteTokenizer(), cache=False, log=None)
>>> train, val = split_documents(corpus, val_fraction=0.25, seed=0)
>>> len(train) + len(val) == corpus.num_tokens, len(val) >= 0.25 * corpus.num_tokens
(True, True)
>>> pack_sequences(train, seq_len=32).shape[1]
32
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxsparse.app.models import cache_dir

__all__ = [
    "DEFAULT_CORPUS_DIR",
    "CORPUS_NAMES",
    "STDLIB_MAX_BYTES",
    "TEXT_SUFFIXES",
    "ByteTokenizer",
    "Corpus",
    "default_corpus_files",
    "debian_docs_files",
    "stdlib_corpus_files",
    "resolve_corpus",
    "find_text_files",
    "tokenizer_key",
    "load_corpus",
    "split_documents",
    "pack_sequences",
]

# Where Debian's python3.11-doc package puts the documentation sources; a system location, not ours.
DEFAULT_CORPUS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text")
# The built-in corpora --data accepts by name.
CORPUS_NAMES = ("stdlib", "debian-docs")
# At most this many bytes of standard-library source (whole files, in path order): 16 MiB is more than
# CPython 3.11's 11 MB, so the cap only bites on unusual installs, and keeps tokenising under a minute.
STDLIB_MAX_BYTES = 16 * 2**20
# Folders of the standard library that are not its prose or code: test suites, third-party packages,
# caches, and the codec tables of `encodings` (hex literals, not text).
_STDLIB_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                                  "encodings"})
# 2: the .npz entry carries a sha256 of its arrays
_CACHE_VERSION = "2"


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
    source: str = ""  # which corpus, in words (for the log and metrics)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]


def debian_docs_files() -> list[Path]:
    """The Python documentation sources of Debian's ``python3.11-doc``, or a ``ValueError`` saying how to get them."""
    files = sorted(DEFAULT_CORPUS_DIR.rglob("*.rst.txt")) if DEFAULT_CORPUS_DIR.is_dir() else []
    if not files:
        raise ValueError(
            f"the debian-docs corpus is not installed ({DEFAULT_CORPUS_DIR} has no *.rst.txt files). Install it "
            "with `apt-get update && apt-get install -y python3.11-doc`, use the built-in `--data stdlib` (no "
            "install needed), or pass text files or folders with --data PATH."
        )
    return files


def stdlib_corpus_files(root: str | Path | None = None, max_bytes: int | None = None) -> list[Path]:
    """The ``.py`` files of the standard library at ``root`` (default: this interpreter's), in path order.

    Test suites, ``site-packages`` and the other folders of ``_STDLIB_SKIPPED_DIRS`` are left out; files
    are taken in sorted relative-path order while the total stays within ``max_bytes`` (default
    :data:`STDLIB_MAX_BYTES`), so the same interpreter always gives the same corpus.
    """
    root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    budget = STDLIB_MAX_BYTES if max_bytes is None else max_bytes
    found: list[tuple[str, Path, int]] = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIPPED_DIRS]  # prune: never walk site-packages
        for name in filenames:
            if name.endswith(".py"):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path, path.stat().st_size))
    files, total = [], 0
    for _, path, size in sorted(found):
        if 0 < size and total + size <= budget:
            files.append(path)
            total += size
    if not files:
        raise ValueError(
            f"the stdlib corpus is empty: no .py source under {str(root)!r} fits in {budget} bytes (an install "
            "without sources?). Pass text files or folders with --data PATH."
        )
    return files


def default_corpus_files() -> list[Path]:
    """``debian-docs`` where it is installed, else ``stdlib`` (see :func:`resolve_corpus`)."""
    return resolve_corpus(None)[1]


def resolve_corpus(paths: Sequence[str | Path] | None) -> tuple[str, list[Path]]:
    """``(description, files)`` for ``--data``: nothing (the default), a built-in name, or files/folders.

    A lone ``stdlib`` or ``debian-docs`` names a built-in corpus (write ``./stdlib`` for a folder of that
    name); with nothing given, ``debian-docs`` where installed, else ``stdlib``.
    """
    names = [str(p) for p in paths] if paths else []
    if len(names) == 1 and names[0] in CORPUS_NAMES:
        choice, chosen_by = names[0], "--data"
    elif not names:
        installed = DEFAULT_CORPUS_DIR.is_dir() and any(DEFAULT_CORPUS_DIR.rglob("*.rst.txt"))
        choice, chosen_by = ("debian-docs" if installed else "stdlib"), "default"
    else:
        if set(names) & set(CORPUS_NAMES):
            raise ValueError(f"--data {' '.join(names)}: a built-in corpus name ({', '.join(CORPUS_NAMES)}) "
                             "cannot be mixed with paths; write ./NAME for a folder of that name")
        files = find_text_files(paths)
        return f"{len(files)} text file(s) from --data", files
    if choice == "debian-docs":
        files = debian_docs_files()
        return f"debian-docs: the Python documentation sources in {DEFAULT_CORPUS_DIR} ({chosen_by})", files
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_corpus_files(root)
    version = ".".join(map(str, sys.version_info[:3]))
    why = "" if chosen_by == "--data" else f", as {DEFAULT_CORPUS_DIR} is not installed"
    return f"stdlib: the .py sources of Python {version}'s standard library in {root} ({chosen_by}{why})", files


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


def _arrays_digest(tokens: np.ndarray, offsets: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    digest.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _read_cache(cache_file: Path, num_documents: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached ``(tokens, offsets)``, or None after one warning if the entry is not whole and ours."""
    try:
        # our own handle: np.load leaves the file it opened unclosed when it is not a zip
        with open(cache_file, "rb") as handle, np.load(handle, allow_pickle=False) as stored:
            tokens, offsets, recorded = stored["tokens"], stored["offsets"], str(stored["digest"])
        problem = None
        if tokens.dtype != np.int32 or offsets.dtype != np.int64 or tokens.ndim != 1 or offsets.ndim != 1:
            problem = f"arrays of dtype {tokens.dtype}/{offsets.dtype}"
        elif len(offsets) != num_documents + 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
            problem = f"{len(offsets) - 1} documents and {len(tokens)} tokens that do not add up"
        elif recorded != _arrays_digest(tokens, offsets):
            problem = "a sha256 that does not match its content"
        if problem is None:
            return tokens, offsets
    except Exception as err:  # noqa: BLE001 - whatever a damaged zip raises (BadZipFile, EOFError, ...), a miss
        problem = f"{type(err).__name__}: {err}"
    warnings.warn(f"corpus cache entry {cache_file} is unusable ({problem}); tokenising again and replacing it",
                  RuntimeWarning, stacklevel=3)
    return None


def _write_cache(cache_file: Path, tokens: np.ndarray, offsets: np.ndarray) -> None:
    """Write the entry atomically: each writer its own temp file, published by ``os.replace``."""
    tmp = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.stem}.", suffix=".npz.part")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, tokens=tokens, offsets=offsets, digest=np.array(_arrays_digest(tokens, offsets)))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, cache_file)  # a concurrent reader sees the old entry, the new one or none, never half
        tmp = None
    except OSError as err:  # a read-only or full cache folder costs the next run a re-tokenisation, no more
        warnings.warn(f"could not write the corpus cache entry {cache_file} ({err}); continuing without it",
                      RuntimeWarning, stacklevel=3)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def load_corpus(
    paths: Sequence[str | Path] | None, tokenizer: Any, cache: bool = True, batch_documents: int = 64,
    log: Callable[[str], Any] | None = print,
) -> Corpus:
    """Tokenise the corpus ``paths`` names (see :func:`resolve_corpus`), one document per file.

    With ``cache=True`` the ids are stored under the fxsparse cache folder and read back on later calls
    with the same files (by content) and the same tokenizer. ``log`` (default ``print``) receives one line
    saying which corpus was used and how many tokens it holds; ``None`` keeps quiet.
    """
    source, files = resolve_corpus(paths)
    contents = [path.read_bytes() for path in files]
    key = _corpus_key(files, contents, tokenizer)
    names = tuple(str(path) for path in files)
    size_mb = sum(map(len, contents)) / 1e6
    cache_file = cache_dir() / "corpus" / f"{key}.npz" if cache else None
    cached = _read_cache(cache_file, len(files)) if cache_file is not None and cache_file.exists() else None
    if cached is not None:
        corpus = Corpus(names, cached[0], cached[1], key, source)
        if log is not None:
            log(f"corpus: {source}; {len(files)} files, {size_mb:.1f} MB, {corpus.num_tokens:,} tokens "
                f"(read from the cache {cache_file})")
        return corpus
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
        _write_cache(cache_file, tokens, offsets)
    corpus = Corpus(names, tokens, offsets, key, source)
    if log is not None:
        log(f"corpus: {source}; {len(files)} files, {size_mb:.1f} MB, {corpus.num_tokens:,} tokens (tokenised now"
            + (f", cached as {cache_file})" if cache_file is not None else ")"))
    return corpus


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
