"""Fine-tuning data: built-in tasks with exactly checkable answers, JSONL loading, collation, evaluation.

A task example is a ``(prompt, response)`` pair. Built-in tasks are generated deterministically from a
seed, with a held-out split that never shares a prompt with the training split:

>>> train, heldout = task_splits("add", n_train=4, n_eval=2, seed=0)
>>> train[0].prompt.startswith("What is"), not {e.prompt for e in train} & {e.prompt for e in heldout}
(True, True)

Examples become token ids through the tokenizer's chat template when it has one (the prompt as the user
turn, the response as the assistant turn), and through a plain ``prompt\\n`` + ``response`` + EOS layout
otherwise. Only response tokens carry a loss: prompt and padding positions are labelled ``-100``.

>>> tok = CharTokenizer()
>>> batch = collate([encode_example(tok, Example("1+1?", "2"))], pad_id=tok.pad_token_id)
>>> batch["labels"].tolist()[0][-2:] == [tok.encode("2")[0], tok.eos_token_id]
True
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "Example",
    "Encoded",
    "CharTokenizer",
    "BatchStream",
    "task_splits",
    "load_jsonl",
    "check_eval_n",
    "encode_example",
    "encode_examples",
    "collate",
    "generate_answers",
    "exact_match",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One prompt and the exact response expected for it."""

    prompt: str
    response: str


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example: ``prompt_ids`` carry no loss, ``response_ids`` do."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


# ---------------------------------------------------------------------------------------------------
# Built-in tasks. Each generator draws one example from a ``random.Random`` (stable across platforms
# and Python versions for randint/choice/sample, unlike torch's generators across devices).
# ---------------------------------------------------------------------------------------------------


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"What is {a} + {b}?", str(a + b))


def _arith(rng: random.Random) -> Example:
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(1, 9)
    op = rng.choice("+-")
    value = a + b * c if op == "+" else a - b * c
    return Example(f"What is {a} {op} {b} * {c}?", str(value))


def _word(rng: random.Random, lo: int = 4, hi: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _reverse(rng: random.Random) -> Example:
    word = _word(rng)
    return Example(f"Reverse the letters of '{word}'.", word[::-1])


def _sort_letters(rng: random.Random) -> Example:
    word = _word(rng)
    return Example(f"Sort the letters of '{word}' alphabetically.", "".join(sorted(word)))


def _sort_digits(rng: random.Random) -> Example:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(4, 6))]
    shown = ", ".join(map(str, digits))
    return Example(f"Sort from smallest to largest: {shown}", ", ".join(map(str, sorted(digits))))


def _last_letter(rng: random.Random) -> Example:
    words = [_word(rng, 3, 6) for _ in range(3)]
    return Example(f"Concatenate the last letters of: {' '.join(words)}", "".join(w[-1] for w in words))


TASKS: dict[str, tuple[str, Callable[[random.Random], Example]]] = {
    "add": ("two-digit addition: 'What is 37 + 48?' -> '85'", _add),
    "arith": ("two-step arithmetic: 'What is 37 + 48 * 3?' -> '181'", _arith),
    "reverse": ("reverse a 4-6 letter string: 'abcde' -> 'edcba'", _reverse),
    "sort-letters": ("sort the letters of a 4-6 letter string: 'dbca' -> 'abcd'", _sort_letters),
    "sort-digits": ("sort 4-6 digits: '5, 2, 9, 1' -> '1, 2, 5, 9'", _sort_digits),
    "last-letters": ("concatenate the last letters of three words: 'ab cd ef' -> 'bdf'", _last_letter),
}


def task_splits(name: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Deterministic ``(train, heldout)`` lists for built-in task ``name``; no prompt is in both.

    The held-out split is drawn first, so it depends only on ``name``, ``n_eval`` and ``seed``: changing
    ``n_train`` never changes what the model is evaluated on.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    draw = TASKS[name][1]
    rng = random.Random(f"fxsparse-task:{name}:{seed}")
    seen: set[str] = set()

    def take(count: int) -> list[Example]:
        out: list[Example] = []
        misses = 0
        while len(out) < count:
            example = draw(rng)
            if example.prompt in seen:
                # a small task space runs out of fresh prompts: fail instead of looping forever
                misses += 1
                if misses > 20_000:
                    raise ValueError(
                        f"task {name!r} has too few distinct prompts for n_train={n_train} + n_eval={n_eval}"
                    )
                continue
            misses = 0
            seen.add(example.prompt)
            out.append(example)
        return out

    heldout = take(n_eval)
    return take(n_train), heldout


def load_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file with one ``{"prompt": str, "response": str}`` object per line.

    Blank lines are skipped; any other bad line raises ``ValueError`` naming the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            for key in ("prompt", "response"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} must be a string, got {record.get(key)!r}")
            if not record["response"]:
                raise ValueError(f"{path}:{lineno}: field 'response' is empty")
            examples.append(Example(record["prompt"], record["response"]))
    if not examples:
        raise ValueError(f"data file {str(path)!r} holds no examples")
    return examples


def check_eval_n(eval_n: int, num_examples: int, source: str) -> None:
    """Raise a ``ValueError`` that says how to fix an ``--eval-n`` that leaves no example to train on.

    >>> check_eval_n(5, 40, "pairs.jsonl")
    >>> check_eval_n(40, 40, "pairs.jsonl")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --eval-n 40 holds out all 40 examples of pairs.jsonl, leaving none to train on: pass --eval-n 4 ...
    """
    if eval_n < num_examples:
        return
    if eval_n == num_examples:
        problem = f"holds out all {num_examples} examples of {source}"
    else:
        problem = f"asks for {eval_n} held-out examples, but {source} has only {num_examples}"
    suggestion = f"--eval-n {num_examples // 10} (10% held out for exact match) or " if num_examples >= 10 else ""
    raise ValueError(f"--eval-n {eval_n} {problem}, leaving none to train on: pass {suggestion}--eval-n 0 (no "
                     "held-out evaluation), or add examples to the file")


# ---------------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------------


class CharTokenizer:
    """A character-level tokenizer for the tiny test models (vocabulary of 80 <= 96 ids), no chat template.

    >>> tok = CharTokenizer()
    >>> tok.decode(tok.encode("What is 2 + 3?"))
    'What is 2 + 3?'
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = 3
    chat_template = None
    _CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +-*/=?:.,!'\n"

    def __init__(self) -> None:
        self._ids = {ch: i + 4 for i, ch in enumerate(self._CHARS)}
        self.vocab_size = len(self._CHARS) + 4

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(ch, self.unk_token_id) for ch in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i >= self.vocab_size:
                # a model with a larger vocabulary can emit ids this tokenizer never made
                out.append("\ufffd")
            elif i >= 4:
                out.append(self._CHARS[i - 4])
            elif not skip_special_tokens:
                out.append(["<pad>", "<s>", "</s>", "<unk>"][i])
        return "".join(out)


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_texts(tokenizer: Any, example: Example) -> tuple[str, str]:
    prompt_turn = [{"role": "user", "content": example.prompt}]
    prompt_text = tokenizer.apply_chat_template(prompt_turn, tokenize=False, add_generation_prompt=True)
    full_turns = prompt_turn + [{"role": "assistant", "content": example.response}]
    full_text = tokenizer.apply_chat_template(full_turns, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            f"the tokenizer's chat template renders the prompt of {example.prompt!r} differently with and "
            "without the answer; cannot separate prompt and response tokens"
        )
    return prompt_text, full_text[len(prompt_text):]


def encode_example(tokenizer: Any, example: Example, seq_len: int | None = None) -> Encoded:
    """Token ids of ``example``: chat template if ``tokenizer`` has one, else ``BOS prompt\\n | response EOS``.

    Prompt and response are tokenised separately so that the prompt ids are exactly what the model sees
    at generation time. With ``seq_len``, the prompt is cut from the left to fit; a response that alone
    does not fit raises ``ValueError``.
    """
    if getattr(tokenizer, "chat_template", None):
        prompt_text, response_text = _chat_texts(tokenizer, example)
        prompt_ids = _encode_text(tokenizer, prompt_text)
        response_ids = _encode_text(tokenizer, response_text)
    else:
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
        prompt_ids = bos + _encode_text(tokenizer, example.prompt + "\n")
        response_ids = _encode_text(tokenizer, example.response) + [tokenizer.eos_token_id]
    if seq_len is not None:
        if len(response_ids) >= seq_len:
            raise ValueError(
                f"seq_len={seq_len} is too short for the response of {example.prompt!r} "
                f"({len(response_ids)} tokens plus at least one prompt token)"
            )
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(response_ids) - seq_len):]
    return Encoded(tuple(prompt_ids), tuple(response_ids))


def encode_examples(tokenizer: Any, examples: Sequence[Example], seq_len: int | None = None) -> list[Encoded]:
    """:func:`encode_example` over a list."""
    return [encode_example(tokenizer, example, seq_len) for example in examples]


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt and padding).

    Labels are aligned with ``input_ids`` (the model shifts them), as in Hugging Face causal LMs.
    """
    if not encoded:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids = e.prompt_ids + e.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(e.prompt_ids) : len(ids)] = torch.tensor(e.response_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchStream:
    """An endless, resumable stream of collated batches: each epoch is a fresh seeded shuffle.

    ``state_dict()`` / ``load_state_dict()`` hold the position (epoch, index), so a resumed stream yields
    exactly the batches the original would have yielded next.

    >>> tok = CharTokenizer()
    >>> data = encode_examples(tok, task_splits("add", 6, 0)[0])
    >>> a = BatchStream(data, batch_size=4, pad_id=0, seed=1); _ = next(a); state = a.state_dict()
    >>> b = BatchStream(data, batch_size=4, pad_id=0, seed=1); b.load_state_dict(state)
    >>> torch.equal(next(a)["input_ids"], next(b)["input_ids"])
    True
    """

    def __init__(self, encoded: Sequence[Encoded], batch_size: int, pad_id: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not encoded:
            raise ValueError("BatchStream needs at least one example")
        self.encoded = list(encoded)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.encoded), generator=generator).tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        # a batch may straddle an epoch boundary, so every batch has exactly batch_size examples
        while len(picked) < self.batch_size:
            if self.index == len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._shuffle(self.epoch)
            picked.append(self.encoded[self._order[self.index]])
            self.index += 1
        return collate(picked, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": len(self.encoded)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != len(self.encoded) or state["seed"] != self.seed:
            raise ValueError(
                f"data position was saved for {state['size']} examples with seed {state['seed']}, "
                f"but this stream has {len(self.encoded)} examples with seed {self.seed}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle(self.epoch)


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers of ``model`` to ``prompts`` (left-padded batches, stripped of whitespace)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [encode_example(tokenizer, Example(p, "x")).prompt_ids
                     for p in prompts[start : start + batch_size]]
            width = max(map(len, chunk))
            # left padding: every row's answer starts right after the last column
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            device = next(model.parameters()).device
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in out[:, width:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                answers.append(_decode(tokenizer, row).strip())
    finally:
        model.train(was_training)
    return answers


def exact_match(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> tuple[float, list[str]]:
    """``(accuracy, answers)``: the fraction of ``examples`` whose greedy answer equals the response exactly.

    Both sides are compared after stripping surrounding whitespace. ``max_new_tokens`` defaults to the
    longest tokenised response plus two, enough to see an answer that runs on past the right one.
    """
    if not examples:
        raise ValueError("exact_match needs at least one example")
    if max_new_tokens is None:
        max_new_tokens = max(len(encode_example(tokenizer, e).response_ids) for e in examples) + 2
    answers = generate_answers(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
    hits = sum(answer == e.response.strip() for answer, e in zip(answers, examples, strict=True))
    return hits / len(examples), answers
