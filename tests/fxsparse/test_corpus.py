"""Tests for fxsparse.app.corpus: file discovery, cached tokenisation, held-out split by document, packing."""

from __future__ import annotations

import sysconfig
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fxsparse.app import corpus as corpus_mod
from fxsparse.app.corpus import (
    ByteTokenizer,
    default_corpus_files,
    find_text_files,
    load_corpus,
    pack_sequences,
    resolve_corpus,
    split_documents,
    stdlib_corpus_files,
    tokenizer_key,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path / "cache"))


def _write_docs(root, count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["sparse", "low", "rank", "token", "the", "of", "graph", "héad", "チャネル"]
    texts = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        text = " ".join(rng.choice(words, size=int(rng.integers(20, 200))))
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


class _CountingTokenizer(ByteTokenizer):
    def __init__(self):
        self.calls = 0

    def encode_batch(self, texts):
        self.calls += 1
        return super().encode_batch(texts)


def test_find_text_files_recurses_filters_and_sorts(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "z.rst").write_text("z")
    (tmp_path / "a" / "b" / "y.rst.txt").write_text("y")
    (tmp_path / "a" / "image.png").write_bytes(b"\x89PNG")
    single = tmp_path / "single.dat"
    single.write_text("named explicitly, so taken whatever its suffix")
    found = find_text_files([tmp_path / "a", single])
    assert {p.name for p in found} == {"z.rst", "y.rst.txt", "single.dat"}
    assert found == sorted(found)


def test_find_text_files_rejects_missing_and_empty(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        find_text_files([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="empty"):
        find_text_files([tmp_path / "empty"])


def test_debian_docs_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "DEFAULT_CORPUS_DIR", tmp_path / "not-installed")
    with pytest.raises(ValueError, match="apt-get install -y python3.11-doc") as err:
        load_corpus(["debian-docs"], ByteTokenizer(), cache=False, log=None)
    assert "--data stdlib" in str(err.value)


def test_default_is_the_stdlib_without_debian_docs(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "DEFAULT_CORPUS_DIR", tmp_path / "not-installed")
    source, files = resolve_corpus(None)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert source.startswith("stdlib:") and "not installed" in source
    assert files == default_corpus_files()
    assert len(files) > 50 and all(p.suffix == ".py" for p in files)
    relative = [p.relative_to(root).as_posix() for p in files]
    assert relative == sorted(relative)
    assert not any({"test", "tests", "site-packages", "__pycache__"} & set(r.split("/")) for r in relative)
    assert sum(p.stat().st_size for p in files) <= corpus_mod.STDLIB_MAX_BYTES
    assert resolve_corpus(["stdlib"])[1] == files


def test_default_prefers_debian_docs_where_installed(tmp_path, monkeypatch):
    docs = tmp_path / "_sources"
    (docs / "library").mkdir(parents=True)
    for name in ("library/os.rst.txt", "tutorial.rst.txt"):
        (docs / name).write_text(f"the text of {name}")
    monkeypatch.setattr(corpus_mod, "DEFAULT_CORPUS_DIR", docs)
    source, files = resolve_corpus(None)
    assert source.startswith("debian-docs:")
    assert [p.name for p in files] == ["os.rst.txt", "tutorial.rst.txt"]
    assert resolve_corpus(["stdlib"])[0].startswith("stdlib:")  # the other one, by name


def test_stdlib_files_skip_tests_and_packages_in_order_under_a_cap(tmp_path):
    root = tmp_path / "lib"
    sizes = {"b.py": 100, "a/__init__.py": 50, "a/z.py": 200, "c.py": 300, "test/test_x.py": 10,
             "a/tests/t.py": 10, "site-packages/pkg.py": 10, "__pycache__/b.py": 10, "encodings/cp.py": 10,
             "notes.txt": 10, "empty.py": 0}
    for name, size in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x" * size)
    names = [p.relative_to(root).as_posix() for p in stdlib_corpus_files(root, max_bytes=10_000)]
    assert names == ["a/__init__.py", "a/z.py", "b.py", "c.py"]
    # the cap skips what does not fit and goes on in path order: 50 + 200 + 100 <= 400, then c.py (300) not
    capped = [p.relative_to(root).as_posix() for p in stdlib_corpus_files(root, max_bytes=400)]
    assert capped == ["a/__init__.py", "a/z.py", "b.py"]
    with pytest.raises(ValueError, match="--data PATH"):
        stdlib_corpus_files(root, max_bytes=10)


def test_corpus_names_and_paths_do_not_mix(tmp_path):
    _write_docs(tmp_path / "docs", 2)
    with pytest.raises(ValueError, match="./NAME"):
        resolve_corpus(["stdlib", str(tmp_path / "docs")])


def test_load_corpus_logs_which_corpus_and_how_many_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "DEFAULT_CORPUS_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(corpus_mod, "STDLIB_MAX_BYTES", 40_000)
    lines = []
    corpus = load_corpus(None, ByteTokenizer(), log=lines.append)
    assert corpus.source.startswith("stdlib:")
    assert len(lines) == 1 and lines[0].startswith("corpus: stdlib:")
    assert f"{corpus.num_tokens:,} tokens (tokenised now" in lines[0]
    again = load_corpus(None, ByteTokenizer(), log=lines.append)
    assert "read from the cache" in lines[1] and again.num_tokens == corpus.num_tokens


def test_load_corpus_ids_are_each_file_then_eos(tmp_path):
    texts = _write_docs(tmp_path / "docs", 5)
    corpus = load_corpus([tmp_path / "docs"], ByteTokenizer(), cache=False)
    assert corpus.num_documents == 5
    assert corpus.tokens.dtype == np.int32
    for i, text in enumerate(texts):
        expected = list(text.encode("utf-8")) + [ByteTokenizer.eos_token_id]
        assert corpus.document(i).tolist() == expected
    assert corpus.num_tokens == sum(len(t.encode("utf-8")) + 1 for t in texts)


def test_cache_hit_miss_and_corrupt_entry(tmp_path):
    _write_docs(tmp_path / "docs", 4)
    tok = _CountingTokenizer()
    first = load_corpus([tmp_path / "docs"], tok)
    calls = tok.calls
    assert calls >= 1
    second = load_corpus([tmp_path / "docs"], tok)
    assert tok.calls == calls, "second load must come from the cache"
    assert second.key == first.key
    np.testing.assert_array_equal(second.tokens, first.tokens)
    np.testing.assert_array_equal(second.offsets, first.offsets)

    cache_file = next((tmp_path / "cache" / "corpus").glob("*.npz"))
    cache_file.write_bytes(b"not an npz file")
    with pytest.warns(RuntimeWarning, match="unusable"):
        third = load_corpus([tmp_path / "docs"], tok)
    assert tok.calls > calls, "a corrupt entry must be re-tokenised"
    np.testing.assert_array_equal(third.tokens, first.tokens)

    (tmp_path / "docs" / "doc00.txt").write_text("changed content")
    fourth = load_corpus([tmp_path / "docs"], tok)
    assert fourth.key != first.key
    assert fourth.document(0).tolist()[:-1] == list(b"changed content")


def _damage_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damage_empty(path):
    path.write_bytes(b"")


def _damage_flip_token(path):
    # a valid zip whose arrays no longer match the recorded sha256 (a flipped bit inside the token array)
    with np.load(path) as stored:
        tokens, offsets, digest = stored["tokens"].copy(), stored["offsets"], stored["digest"]
    tokens[len(tokens) // 2] ^= 1
    with open(path, "wb") as handle:
        np.savez(handle, tokens=tokens, offsets=offsets, digest=digest)


def _damage_foreign(path):
    with open(path, "wb") as handle:
        np.savez(handle, tokens=np.arange(5, dtype=np.int64), offsets=np.array([0, 5]))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_empty, _damage_flip_token, _damage_foreign])
def test_damaged_cache_entry_is_a_miss_with_one_warning(tmp_path, damage):
    _write_docs(tmp_path / "docs", 5)
    tok = _CountingTokenizer()
    first = load_corpus([tmp_path / "docs"], tok, log=None)
    cache_file = next((tmp_path / "cache" / "corpus").glob("*.npz"))
    damage(cache_file)
    calls = tok.calls
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = load_corpus([tmp_path / "docs"], tok, log=None)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert str(cache_file) in messages[0] and "tokenising again" in messages[0]
    assert tok.calls > calls, "the damaged entry must be tokenised again"
    np.testing.assert_array_equal(again.tokens, first.tokens)
    np.testing.assert_array_equal(again.offsets, first.offsets)
    # rebuilt whole: the next load reads it back with no warning and no tokenising
    calls = tok.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_corpus([tmp_path / "docs"], tok, log=None)
    assert tok.calls == calls
    with np.load(cache_file) as stored:  # a real zip again, with the three arrays
        assert sorted(stored.files) == ["digest", "offsets", "tokens"]
    assert zipfile.is_zipfile(cache_file)


def test_cache_write_is_atomic_and_a_failed_write_is_not_fatal(tmp_path, monkeypatch):
    _write_docs(tmp_path / "docs", 3)
    folder = tmp_path / "cache" / "corpus"

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(corpus_mod.os, "replace", refuse)
    with pytest.warns(RuntimeWarning, match="No space left"):
        corpus = load_corpus([tmp_path / "docs"], ByteTokenizer(), log=None)
    assert corpus.num_documents == 3
    assert list(folder.iterdir()) == [], "no entry and no temp file left behind"
    monkeypatch.undo()
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    load_corpus([tmp_path / "docs"], ByteTokenizer(), log=None)
    assert [p.suffix for p in folder.iterdir()] == [".npz"], "published under its final name only"


def test_tokenizer_key_follows_vocabulary():
    class Vocab:
        eos_token_id = 0

        def __init__(self, vocab):
            self.vocab = vocab

        def __len__(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

    a = Vocab({"a": 0, "b": 1})
    assert tokenizer_key(a) == tokenizer_key(Vocab({"b": 1, "a": 0}))
    assert tokenizer_key(a) != tokenizer_key(Vocab({"a": 1, "b": 0}))


@pytest.mark.parametrize("val_fraction", [0.1, 0.3])
def test_split_is_by_whole_document_and_deterministic(tmp_path, val_fraction):
    _write_docs(tmp_path / "docs", 12, seed=3)
    corpus = load_corpus([tmp_path / "docs"], ByteTokenizer(), cache=False)
    train, val = split_documents(corpus, val_fraction=val_fraction, seed=7)
    again_train, again_val = split_documents(corpus, val_fraction=val_fraction, seed=7)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert len(val) >= val_fraction * corpus.num_tokens
    assert len(train) + len(val) == corpus.num_tokens

    # rebuild each split as a sequence of whole documents: every document lands in exactly one split
    docs = [corpus.document(i).tolist() for i in range(corpus.num_documents)]
    eos = ByteTokenizer.eos_token_id

    def _documents_of(ids):
        pieces, current = [], []
        for t in ids.tolist():
            current.append(t)
            if t == eos:
                pieces.append(current)
                current = []
        assert current == []
        return pieces

    train_docs, val_docs = _documents_of(train), _documents_of(val)
    assert sorted(map(tuple, train_docs + val_docs)) == sorted(map(tuple, docs))
    assert not set(map(tuple, train_docs)) & set(map(tuple, val_docs))


def test_split_depends_on_seed_and_rejects_bad_input(tmp_path):
    _write_docs(tmp_path / "docs", 12, seed=1)
    corpus = load_corpus([tmp_path / "docs"], ByteTokenizer(), cache=False)
    vals = {tuple(split_documents(corpus, 0.2, seed=s)[1].tolist()) for s in range(6)}
    assert len(vals) > 1
    with pytest.raises(ValueError, match="1.5"):
        split_documents(corpus, 1.5)
    _write_docs(tmp_path / "one", 1)
    with pytest.raises(ValueError, match="2 documents"):
        split_documents(load_corpus([tmp_path / "one"], ByteTokenizer(), cache=False), 0.1)


def test_pack_sequences_rows_are_consecutive_slices():
    ids = np.random.default_rng(0).integers(0, 257, size=1000).astype(np.int32)
    packed = pack_sequences(ids, seq_len=64)
    assert packed.shape == (1000 // 64, 64) and packed.dtype == torch.int64
    assert packed.flatten().tolist() == ids[: 15 * 64].tolist()
    with pytest.raises(ValueError, match="2000"):
        pack_sequences(ids, seq_len=2000)
    with pytest.raises(ValueError, match="seq_len"):
        pack_sequences(ids, seq_len=1)


def test_pretrain_with_no_data_and_no_debian_docs_uses_the_stdlib(tmp_path, monkeypatch, capsys):
    import json

    from fxsparse.app.cli import main

    monkeypatch.setattr(corpus_mod, "DEFAULT_CORPUS_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(corpus_mod, "STDLIB_MAX_BYTES", 300_000)  # the first files in path order: fast
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "9m", "--steps", "3", "--tokenizer", "bytes", "--seq-len", "64",
                 "--batch-size", "2", "--eval-batches", "2", "--no-progress", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    line = next(x for x in log.splitlines() if x.startswith("corpus: "))
    assert line.startswith("corpus: stdlib:") and "tokens" in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['corpus']['tokens']:,} tokens" in line
    assert len(metrics["history"]) == 3 and metrics["evals"]
