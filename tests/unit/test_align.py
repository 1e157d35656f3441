"""Token alignment under the real Llama-3 tokenizer, and filtering pairs by a model's answers."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from interp.data import AlignedPair, NumberChange, Pair, align, filter_by_model, gsm8k_pairs
from interp.data.align import ANSWER_PREFIX, answer_ids, answer_text

GSM8K_TEST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def make_pair(clean: str, corrupted: str, old: str, new: str, answers=(18.0, 20.0), pid="p") -> Pair:
    start = clean.index(old)
    return Pair(pid, clean, corrupted, answers[0], answers[1], NumberChange(old, new, (start, start + len(old))))


def test_tokenizer_prepends_bos_and_splits_the_answer(llama3_tokenizer):
    tok = llama3_tokenizer
    ids = tok("Janet has 16 eggs.")["input_ids"]
    assert ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<|begin_of_text|>")
    # " 16" after "The answer is:" is two tokens: " " and "16"
    assert tok.convert_ids_to_tokens(list(answer_ids(tok, 16.0))) == ["\u0120", "16"]
    assert tok.decode(list(answer_ids(tok, 1234.0))) == " 1234"
    prefix = tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    assert tok(f"{ANSWER_PREFIX} 16", add_special_tokens=False)["input_ids"] == [*prefix, *answer_ids(tok, 16.0)]


def test_answer_text_renders_integers_without_point():
    assert answer_text(18.0) == "18"
    assert answer_text(70000.0) == "70000"
    assert answer_text(2.5) == "2.5"
    assert answer_text(-3.0) == "-3"


def test_nine_to_ten_keeps_the_token_count(llama3_tokenizer):
    pair = make_pair("Tom has 9 apples and eats 2.", "Tom has 10 apples and eats 2.", "9", "10")
    counts = Counter()
    (a,) = align([pair], llama3_tokenizer, counts=counts)
    assert isinstance(a, AlignedPair) and a.pair == pair
    assert len(a.clean_ids) == len(a.corrupted_ids) and a.clean_ids[0] == llama3_tokenizer.bos_token_id
    (pos,) = a.diff_positions
    assert llama3_tokenizer.decode([a.clean_ids[pos]]) == "9"
    assert llama3_tokenizer.decode([a.corrupted_ids[pos]]) == "10"
    # answers " 18" / " 20": same " " token, then "18" vs "20"
    assert a.first_diff == 1 and a.clean_answer_ids[0] == a.corrupted_answer_ids[0]
    assert counts["in"] == counts["kept"] == 1


def test_drop_reasons(llama3_tokenizer):
    pairs = [
        # Llama-3 groups digits by three: "999" is one token, "1000" is "100" + "0"
        make_pair("Tom has 999 apples.", "Tom has 1000 apples.", "999", "1000", pid="longer"),
        # tokens change outside the number's span (the name changed too)
        make_pair("Tom has 9 apples.", "Tim has 8 apples.", "9", "8", pid="outside"),
        # the stated span is the wrong number: the differing token lies outside it
        Pair("span", "Tom has 9 apples and 4 pears.", "Tom has 9 apples and 5 pears.", 13.0, 14.0, NumberChange("9", "9", (8, 9))),
        make_pair("Tom has 9 apples.", "Tom has 9 apples.", "9", "9", pid="same"),
        # answers 100 and 1000 tokenize " ", "100" and " ", "100", "0": no token where both differ
        make_pair("Tom has 4 apples.", "Tom has 5 apples.", "4", "5", answers=(100.0, 1000.0), pid="answers"),
        make_pair("Tom has 4 apples.", "Tom has 5 apples.", "4", "5", pid="kept"),
    ]
    counts = Counter()
    kept = align(pairs, llama3_tokenizer, counts=counts)
    assert [a.pair.id for a in kept] == ["kept"]
    assert {k: v for k, v in counts.items() if v} == {
        "in": 6,
        "drop.length_changed": 1,
        "drop.diff_outside_span": 2,
        "drop.same_tokens": 1,
        "drop.answer_tokens_not_different": 1,
        "kept": 1,
    }


def test_answer_prefix_merge_is_detected():
    class MergingTokenizer:
        """Tokenizes by characters, except that ": 7" merges into one token."""

        is_fast = True

        def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
            ids = [ord(c) for c in text.replace(": 7", "\0")]
            return {"input_ids": ids}

    assert answer_ids(MergingTokenizer(), 7.0) is None
    assert answer_ids(MergingTokenizer(), 8.0) == (ord(" "), ord("8"))


def test_slow_tokenizer_is_refused():
    with pytest.raises(TypeError, match="fast tokenizer"):
        align([], object())


def test_real_gsm8k_pairs_align(llama3_tokenizer, tmp_path):
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K copy not found at {GSM8K_TEST}")
    rows = GSM8K_TEST.read_text(encoding="utf-8").splitlines()[:80]
    (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n")
    pairs = gsm8k_pairs(tmp_path / "t.jsonl")
    aligned = align(pairs, llama3_tokenizer)
    assert len(aligned) == len(pairs) > 20  # same digit count -> same token count under Llama-3
    for a in aligned:
        start = a.pair.change.span[0]
        changed = "".join(llama3_tokenizer.decode([a.corrupted_ids[i]]) for i in a.diff_positions)
        assert changed.strip() in a.pair.change.new
        assert a.pair.corrupted_question[start : start + len(a.pair.change.new)] == a.pair.change.new
        assert a.clean_answer_ids[a.first_diff] != a.corrupted_answer_ids[a.first_diff]
        assert llama3_tokenizer.decode(list(a.clean_answer_ids)) == " " + answer_text(a.pair.clean_answer)
        assert json.loads(rows[int(a.pair.id.split("-")[-1])])["question"] == a.pair.clean_question


# ---------------------------------------------------------------- filter_by_model


@dataclass
class FakeGeneration:
    answer: float | None


class FakeModel:
    """Answers from a table (None = unparseable output) and records each batch it is asked."""

    def __init__(self, answers: dict[str, float | None]):
        self.answers, self.batches = answers, []

    def generate_batch(self, questions: list[str], max_new_tokens: int = 32) -> list[FakeGeneration]:
        self.batches.append((list(questions), max_new_tokens))
        return [FakeGeneration(self.answers[q]) for q in questions]


def fake_pairs():
    pairs = [make_pair(f"Box {name} has 4.", f"Box {name} has 5.", "4", "5", answers=(i, i + 100.0), pid=str(i)) for i, name in enumerate("ABCDE")]
    answers = {}
    for i, p in enumerate(pairs):
        answers[p.clean_question] = [p.clean_answer, p.clean_answer, 7e9, None, p.clean_answer + 1e-9][i]
        answers[p.corrupted_question] = [p.corrupted_answer, p.clean_answer, 0.0, 0.0, p.corrupted_answer][i]
    return pairs, answers


def test_filter_by_model_both_sides():
    pairs, answers = fake_pairs()
    model, counts = FakeModel(answers), Counter()
    kept = filter_by_model(model, pairs, batch_size=2, max_new_tokens=7, counts=counts)
    assert [p.id for p in kept] == ["0", "4"]
    assert dict(counts) == {"in": 5, "drop.clean_wrong": 2, "drop.corrupted_wrong": 1, "kept": 2}
    asked = [q for batch, _ in model.batches for q in batch]
    assert asked[:5] == [p.clean_question for p in pairs]
    assert asked[5:] == [pairs[i].corrupted_question for i in (0, 1, 4)]  # only clean-correct ones
    assert all(len(batch) <= 2 and n == 7 for batch, n in model.batches)


def test_filter_by_model_clean_only_and_aligned_input(llama3_tokenizer):
    pairs, answers = fake_pairs()
    assert [p.id for p in filter_by_model(FakeModel(answers), pairs, both=False)] == ["0", "1", "4"]
    aligned = align(pairs, llama3_tokenizer)
    kept = filter_by_model(FakeModel(answers), aligned)
    assert all(isinstance(a, AlignedPair) for a in kept) and [a.pair.id for a in kept] == ["0", "4"]


def test_filter_by_model_checks_the_model_reply():
    pairs, answers = fake_pairs()

    class ShortModel(FakeModel):
        def generate_batch(self, questions, max_new_tokens=32):
            return super().generate_batch(questions, max_new_tokens)[:-1]

    with pytest.raises(ValueError, match="returned 4 generations for 5 questions"):
        filter_by_model(ShortModel(answers), pairs)
    with pytest.raises(ValueError, match="batch_size"):
        filter_by_model(FakeModel(answers), pairs, batch_size=0)
