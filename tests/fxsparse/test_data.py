"""Built-in tasks, JSONL loading, tokenisation with and without a chat template, collation, evaluation."""

from __future__ import annotations

import json
import re
import string

import pytest
import torch

from fxsparse.app.data import (
    IGNORE_INDEX,
    TASKS,
    BatchStream,
    CharTokenizer,
    Encoded,
    Example,
    collate,
    encode_example,
    encode_examples,
    exact_match,
    generate_answers,
    load_jsonl,
    task_splits,
)
from fxsparse.models import tiny_model


def chatml_tokenizer():
    """A real Hugging Face fast tokenizer, character-level, with a ChatML template (80 ids, fits tiny models)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(CharTokenizer._CHARS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<unk>",
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def _check_answer(name: str, example: Example) -> str:
    """The right answer recomputed from the prompt text alone, independently of the generators."""
    p = example.prompt
    if name in ("add", "arith"):
        expr = re.fullmatch(r"What is ([-+*\d ]+)\?", p).group(1)
        assert re.fullmatch(r"[\d +*-]+", expr)
        return str(eval(expr))  # noqa: S307 - digits and + - * only, checked above
    if name == "reverse":
        return re.search(r"'([a-z]+)'", p).group(1)[::-1]
    if name == "sort-letters":
        return "".join(sorted(re.search(r"'([a-z]+)'", p).group(1)))
    if name == "sort-digits":
        digits = [int(d) for d in p.split(":")[1].split(",")]
        return ", ".join(str(d) for d in sorted(digits))
    if name == "last-letters":
        return "".join(w[-1] for w in p.split(":")[1].split())
    raise AssertionError(f"no checker for task {name}")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_answers_are_right_and_splits_disjoint(name):
    train, heldout = task_splits(name, n_train=300, n_eval=60, seed=3)
    assert len(train) == 300 and len(heldout) == 60
    for example in train + heldout:
        assert example.response == _check_answer(name, example), example
    prompts = [e.prompt for e in train + heldout]
    assert len(set(prompts)) == len(prompts)  # no duplicates within or across the splits


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_splits_deterministic_and_heldout_independent_of_train_size(name):
    a_train, a_held = task_splits(name, 50, 20, seed=7)
    b_train, b_held = task_splits(name, 50, 20, seed=7)
    assert a_train == b_train and a_held == b_held
    _, c_held = task_splits(name, 500, 20, seed=7)
    assert c_held == a_held
    _, d_held = task_splits(name, 50, 20, seed=8)
    assert d_held != a_held


def test_task_errors_name_the_value():
    with pytest.raises(ValueError, match="'nope'"):
        task_splits("nope", 1, 1)
    with pytest.raises(ValueError, match="n_train=-1"):
        task_splits("add", -1, 1)
    with pytest.raises(ValueError, match="too few distinct prompts"):
        task_splits("add", 9000, 10)  # only 90 * 90 = 8100 distinct additions exist


def test_load_jsonl_reads_pairs_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "a?", "response": "b"}, {"prompt": "c?", "response": "d", "extra": 1}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert load_jsonl(path) == [Example("a?", "b"), Example("c?", "d")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "x"}', "'response' must be a string"),
        ('{"prompt": 3, "response": "y"}', "'prompt' must be a string"),
        ('{"prompt": "x", "response": ""}', "'response' is empty"),
    ],
)
def test_load_jsonl_names_the_bad_line(tmp_path, bad_line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: .*{re.escape(message)}"):
        load_jsonl(path)


def test_load_jsonl_missing_or_empty_file(tmp_path):
    with pytest.raises(ValueError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_char_tokenizer_round_trip_and_fits_tiny_vocab():
    tok = CharTokenizer()
    text = string.digits + string.ascii_letters + " +-*/=?:.,!'\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size <= tiny_model("llama").config.vocab_size
    assert tok.encode("~") == [tok.unk_token_id]
    assert tok.decode([tok.vocab_size, tok.pad_token_id, *tok.encode("7")]) == "\ufffd7"


def test_encode_without_chat_template():
    tok = CharTokenizer()
    enc = encode_example(tok, Example("What is 2 + 3?", "5"))
    assert enc.prompt_ids == (tok.bos_token_id, *tok.encode("What is 2 + 3?\n"))
    assert enc.response_ids == (*tok.encode("5"), tok.eos_token_id)


def test_encode_with_chat_template_splits_prompt_and_response():
    tok = chatml_tokenizer()
    enc = encode_example(tok, Example("What is 2 + 3?", "5"))
    prompt = tok.decode(enc.prompt_ids, skip_special_tokens=False)
    response = tok.decode(enc.response_ids, skip_special_tokens=False)
    assert prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert response == "5<|im_end|>\n"
    # the prompt ids are exactly what generation starts from
    rendered = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                       add_generation_prompt=True)
    assert list(enc.prompt_ids) == tok(rendered, add_special_tokens=False)["input_ids"]


def test_seq_len_cuts_prompt_from_the_left_and_rejects_long_response():
    tok = CharTokenizer()
    full = encode_example(tok, Example("abcdefgh", "xyz"))
    cut = encode_example(tok, Example("abcdefgh", "xyz"), seq_len=7)
    assert cut.response_ids == full.response_ids
    assert cut.prompt_ids == full.prompt_ids[-3:]
    with pytest.raises(ValueError, match="seq_len=4"):
        encode_example(tok, Example("abcdefgh", "xyz"), seq_len=4)


def test_collate_masks_prompt_and_padding():
    encoded = [Encoded((1, 10, 11), (20, 2)), Encoded((1, 12), (21, 22, 23, 2))]
    batch = collate(encoded, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 20, 2, 0], [1, 12, 21, 22, 23, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    m = IGNORE_INDEX
    assert batch["labels"].tolist() == [[m, m, m, 20, 2, m], [m, m, 21, 22, 23, 2]]
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)


def test_batch_stream_covers_each_epoch_and_resumes_exactly():
    encoded = [Encoded((1, i), (i + 2, 2)) for i in range(10)]
    stream = BatchStream(encoded, batch_size=5, pad_id=0, seed=4)
    epoch0 = torch.cat([next(stream)["input_ids"][:, 1] for _ in range(2)])
    assert sorted(epoch0.tolist()) == list(range(10))
    epoch1 = torch.cat([next(stream)["input_ids"][:, 1] for _ in range(2)])
    assert sorted(epoch1.tolist()) == list(range(10)) and not torch.equal(epoch0, epoch1)

    # batches of 3 straddle epoch boundaries; resume mid-way from a saved position
    a = BatchStream(encoded, batch_size=3, pad_id=0, seed=4)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    b = BatchStream(encoded, batch_size=3, pad_id=0, seed=4)
    b.load_state_dict(state)
    for _ in range(6):
        assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])
    with pytest.raises(ValueError, match="seed 4"):
        BatchStream(encoded, batch_size=3, pad_id=0, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        BatchStream(encoded, batch_size=0, pad_id=0)


@pytest.mark.parametrize("tokenizer", [CharTokenizer(), chatml_tokenizer()], ids=["char", "chatml"])
def test_batched_left_padded_generation_matches_one_by_one(tokenizer):
    model = tiny_model("llama", seed=1)
    prompts = ["What is 2 + 3?", "Hi", "Reverse the letters of 'abcdef'."]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=8)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert any(batched)  # a random model still emits tokens; the comparison is not between empty strings


class _ScriptedModel(torch.nn.Module):
    """Stands in for a model: ``generate`` appends a fixed token sequence per prompt (matched by content)."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.replies = {tuple(encode_example(tokenizer, Example(p, "x")).prompt_ids): reply
                        for p, reply in replies.items()}

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = tuple(i for i, m in zip(ids, mask, strict=True) if m)
            reply = self.tokenizer.encode(self.replies[prompt]) + [self.tokenizer.eos_token_id] * max_new_tokens
            rows.append(ids + reply[:max_new_tokens])
        return torch.tensor(rows)


def test_exact_match_counts_only_exact_answers():
    tok = CharTokenizer()
    examples = [Example("a", "12"), Example("b", "7"), Example("c", "x y"), Example("d", "5")]
    # right; right with surrounding spaces; wrong (extra text); wrong (prefix only)
    model = _ScriptedModel(tok, {"a": "12", "b": " 7 ", "c": "x y z", "d": ""})
    accuracy, answers = exact_match(model, tok, examples, max_new_tokens=6, batch_size=3)
    assert answers == ["12", "7", "x y z", ""]
    assert accuracy == 0.5
    with pytest.raises(ValueError, match="at least one"):
        exact_match(model, tok, [])


def test_encode_examples_on_task_data_fits_seq_len():
    tok = CharTokenizer()
    train, _ = task_splits("arith", 20, 0)
    encoded = encode_examples(tok, train, seq_len=24)
    assert all(len(e.prompt_ids) + len(e.response_ids) <= 24 for e in encoded)
