"""Tests for fxsparse.app.corpus: file discovery, cached tokenisation, held-out split by document, packing."""

from __future__ import annotations

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
    split_documents,
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


def test_default_corpus_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "DEFAULT_CORPUS_DIR", tmp_path / "not-installed")
    with pytest.raises(ValueError, match="apt-get install -y python3.11-doc"):
        default_corpus_files()
    with pytest.raises(ValueError, match="--data"):
        load_corpus(None, ByteTokenizer(), cache=False)


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
    third = load_corpus([tmp_path / "docs"], tok)
    assert tok.calls > calls, "a corrupt entry must be re-tokenised"
    np.testing.assert_array_equal(third.tokens, first.tokens)

    (tmp_path / "docs" / "doc00.txt").write_text("changed content")
    fourth = load_corpus([tmp_path / "docs"], tok)
    assert fourth.key != first.key
    assert fourth.document(0).tolist()[:-1] == list(b"changed content")


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
