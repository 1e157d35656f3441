"""Token-level alignment of pairs, and filtering pairs by what a model answers.

Patching compares the clean and corrupted runs position by position, so the two prompts must
have the same token length and differ only where the number changed; the answer is scored at the
first answer token where the two answers differ (Llama-3 splits " 16" into " " + "16", so that
is usually the second answer token). See /work/shared/CODI.md, "Patching CODI correctly".

Both functions fill an optional `collections.Counter` with their stage counts:
`align`: `in`, `drop.length_changed`, `drop.same_tokens`, `drop.diff_outside_span`,
`drop.answer_prefix_merged`, `drop.answer_tokens_not_different`, `kept`.
`filter_by_model`: `in`, `drop.clean_wrong`, `drop.corrupted_wrong`, `kept`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from interp.data.pairs import Pair
from interp.family import answers_equal

ANSWER_PREFIX = "The answer is:"


@dataclass(frozen=True)
class AlignedPair:
    """A pair with its token ids as the model sees them.

    `clean_ids`/`corrupted_ids`: `tokenizer(question)["input_ids"]`, BOS included, equal length.
    `diff_positions`: the positions where they differ (all inside the changed number).
    `clean_answer_ids`/`corrupted_answer_ids`: the tokens of " <answer>" following the answer
    prefix (`ANSWER_PREFIX` unless `align` was given another); `first_diff`: the first index where
    these differ (present in both).
    """

    pair: Pair
    clean_ids: tuple[int, ...]
    corrupted_ids: tuple[int, ...]
    diff_positions: tuple[int, ...]
    clean_answer_ids: tuple[int, ...]
    corrupted_answer_ids: tuple[int, ...]
    first_diff: int


def answer_text(value: float | str) -> str:
    """How an answer is written after "The answer is: ": "18", not "18.0"; "2.5" stays; text as is."""
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def answer_ids(tokenizer: Any, value: float | str, prefix: str = ANSWER_PREFIX) -> tuple[int, ...] | None:
    """The tokens of " <value>" as they tokenize after `prefix`, or None when the tokenizer
    merges the prefix with the answer (the prefix tokens are then not a true prefix)."""
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(f"{prefix} {answer_text(value)}", add_special_tokens=False)["input_ids"]
    if list(full[: len(prefix_ids)]) != list(prefix_ids):
        return None
    return tuple(full[len(prefix_ids) :])


def _overlaps(offset: tuple[int, int], span: tuple[int, int]) -> bool:
    return offset[0] < span[1] and span[0] < offset[1]


def _align_one(pair: Pair, tokenizer: Any, answer_prefix: str, question_suffix: str) -> AlignedPair | str:
    """The aligned pair, or the name of the reason it is dropped."""
    clean = tokenizer(pair.clean_question + question_suffix, return_offsets_mapping=True)
    corrupted = tokenizer(pair.corrupted_question + question_suffix, return_offsets_mapping=True)
    c_ids, k_ids = tuple(clean["input_ids"]), tuple(corrupted["input_ids"])
    if len(c_ids) != len(k_ids):
        return "length_changed"
    diffs = tuple(i for i, (a, b) in enumerate(zip(c_ids, k_ids)) if a != b)
    if not diffs:
        return "same_tokens"
    start = pair.change.span[0]
    new_span = (start, start + len(pair.change.new))
    inside = all(_overlaps(clean["offset_mapping"][i], pair.change.span) and _overlaps(corrupted["offset_mapping"][i], new_span) for i in diffs)
    if not inside:
        return "diff_outside_span"
    c_ans, k_ans = answer_ids(tokenizer, pair.clean_answer, answer_prefix), answer_ids(tokenizer, pair.corrupted_answer, answer_prefix)
    if c_ans is None or k_ans is None:
        return "answer_prefix_merged"
    first = next((i for i, (a, b) in enumerate(zip(c_ans, k_ans)) if a != b), None)
    if first is None:
        return "answer_tokens_not_different"
    return AlignedPair(pair, c_ids, k_ids, diffs, c_ans, k_ans, first)


def align(pairs: Sequence[Pair], tokenizer: Any, counts: Counter | None = None, answer_prefix: str = ANSWER_PREFIX, question_suffix: str = "") -> list[AlignedPair]:
    """Keep the pairs that align token by token under `tokenizer` (a fast Hugging Face tokenizer).

    A pair is kept when its two questions have equal token length and differ only in tokens
    overlapping the changed number's character span, and its two answers (after `answer_prefix`:
    "The answer is:" for CODI, "###" for Coconut, whose answer text is "### " + answer) differ at
    some token present in both. `question_suffix` is what the model writes after each question
    before tokenizing (Coconut: a newline). `counts` receives the counts listed in the module docstring
    (e.g. `drop.length_changed` for "9" -> "10" under a tokenizer that splits "10").
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"align needs a fast tokenizer (offset mapping), got {type(tokenizer).__name__}; "
            "load it with transformers.AutoTokenizer.from_pretrained(..., use_fast=True) "
            "or PreTrainedTokenizerFast(tokenizer_file=...)"
        )
    counts = Counter() if counts is None else counts
    counts.update(dict.fromkeys(["in", "drop.length_changed", "drop.same_tokens", "drop.diff_outside_span", "drop.answer_prefix_merged", "drop.answer_tokens_not_different", "kept"], 0))
    kept = []
    for pair in pairs:
        counts["in"] += 1
        result = _align_one(pair, tokenizer, answer_prefix, question_suffix)
        if isinstance(result, str):
            counts[f"drop.{result}"] += 1
        else:
            counts["kept"] += 1
            kept.append(result)
    return kept


def align_to_model(pairs: Sequence[Pair], model: Any, counts: Counter | None = None) -> list[AlignedPair]:
    """`align` as `model` (a `LatentModel`) reads its prompts: its tokenizer, question text and answer prefix."""
    suffix = model.family.question_text("")
    return align(pairs, model.tokenizer, counts=counts, answer_prefix=model.answer_prefix, question_suffix=suffix)


class Generation(Protocol):
    """What `filter_by_model` reads from a generation: the parsed numeric answer, if any."""

    answer: float | str | None


class Generator(Protocol):
    """The part of `interp.model.LatentModel` that `filter_by_model` uses."""

    def generate_batch(self, questions: list[str], max_new_tokens: int = 32) -> Sequence[Generation]: ...


T = TypeVar("T", Pair, AlignedPair)


def _correct(generation: Generation, expected: float | str) -> bool:
    return answers_equal(generation.answer, expected)


def _answers_correct(model: Generator, questions: list[str], expected: list[float], batch_size: int, max_new_tokens: int) -> list[bool]:
    out: list[bool] = []
    for i in range(0, len(questions), batch_size):
        batch = questions[i : i + batch_size]
        generations = model.generate_batch(batch, max_new_tokens=max_new_tokens)
        if len(generations) != len(batch):
            raise ValueError(f"model.generate_batch returned {len(generations)} generations for {len(batch)} questions")
        out += [_correct(g, e) for g, e in zip(generations, expected[i : i + batch_size])]
    return out


def filter_by_model(
    model: Generator,
    pairs: Sequence[T],
    both: bool = True,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    counts: Counter | None = None,
) -> list[T]:
    """Keep the pairs (or aligned pairs) whose clean question the model answers correctly and,
    with `both`, whose corrupted question too (asked only for the clean-correct ones).

    `model.generate_batch(questions, max_new_tokens=...)` must return one object per question
    with `.answer: float | str | None` (compared by `interp.family.answers_equal`). `counts` receives the counts listed in the module docstring.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    counts = Counter() if counts is None else counts
    counts.update(dict.fromkeys(["in", "drop.clean_wrong", "drop.corrupted_wrong", "kept"], 0))
    counts["in"] += len(pairs)
    plain = [p.pair if isinstance(p, AlignedPair) else p for p in pairs]
    ok = _answers_correct(model, [p.clean_question for p in plain], [p.clean_answer for p in plain], batch_size, max_new_tokens)
    survivors = [i for i, good in enumerate(ok) if good]
    counts["drop.clean_wrong"] += len(pairs) - len(survivors)
    if both:
        ok = _answers_correct(model, [plain[i].corrupted_question for i in survivors], [plain[i].corrupted_answer for i in survivors], batch_size, max_new_tokens)
        counts["drop.corrupted_wrong"] += ok.count(False)
        survivors = [i for i, good in zip(survivors, ok) if good]
    counts["kept"] += len(survivors)
    return [pairs[i] for i in survivors]
