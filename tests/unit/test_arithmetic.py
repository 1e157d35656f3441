"""The synthetic modular-arithmetic task: hand-worked problems and properties of its pairs."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interp.data import arithmetic_pairs
from interp.data.arithmetic import ArithmeticProblem, apply_op, corrupt, sample_problems


def test_docstring_example():
    # 7 +5 = 12 -> 2; *3 = 6; -2 = 4; *7 = 28 -> 8; +4 = 12 -> 2; -1 = 1
    p = ArithmeticProblem(7, (("+", 5), ("*", 3), ("-", 2), ("*", 7), ("+", 4), ("-", 1)))
    assert p.question == "7 +5 *3 -2 *7 +4 -1"
    assert p.values == [2, 6, 4, 8, 2, 1]
    assert p.chain_of_thought == "2 6 4 8 2 1"
    assert p.answer == 1


@pytest.mark.parametrize(
    "x0, ops, question, values",
    [
        (0, (("-", 3),), "0 -3", [7]),  # 0 - 3 = -3 -> 7 (mod 10)
        (9, (("*", 9), ("+", 1)), "9 *9 +1", [1, 2]),  # 81 -> 1; 1 + 1 = 2
        (5, (("*", 3), ("-", 9), ("*", 7)), "5 *3 -9 *7", [5, 6, 2]),  # 15 -> 5; 5-9 = -4 -> 6; 42 -> 2
    ],
)
def test_hand_worked_problems(x0, ops, question, values):
    p = ArithmeticProblem(x0, ops)
    assert p.question == question
    assert p.values == values
    assert p.answer == values[-1]


def test_apply_op_rejects_unknown_operator():
    with pytest.raises(ValueError, match="unknown operator"):
        apply_op(1, "/", 2)


def test_steps_validation():
    with pytest.raises(ValueError, match="steps must be"):
        arithmetic_pairs(3, steps=0)
    with pytest.raises(ValueError, match="steps must be"):
        sample_problems(3, steps=(4, 2))


def test_corrupt_changes_the_answer():
    clean = ArithmeticProblem(7, (("+", 5), ("*", 3)))
    corrupted, slot = corrupt(clean, random.Random(0))
    assert corrupted.answer != clean.answer
    changed = [i for i, (a, b) in enumerate(zip([clean.x0, *clean.ops], [corrupted.x0, *corrupted.ops])) if a != b]
    assert changed == [slot]


def test_pairs_are_deterministic_and_hand_checkable():
    pairs = arithmetic_pairs(20, steps=(1, 8), seed=3)
    assert pairs == arithmetic_pairs(20, steps=(1, 8), seed=3)
    assert [p.id for p in pairs] == [f"arith-3-{i}" for i in range(20)]
    for p in pairs:
        assert p.source["clean_values"][-1] == p.clean_answer
        assert p.source["corrupted_values"][-1] == p.corrupted_answer


def parse_and_solve(question: str) -> tuple[list[int], int]:
    """An independent reading of the question text: its numbers, and the answer mod 10."""
    head, *ops = question.split(" ")
    value, numbers = int(head), [int(head)]
    for token in ops:
        op, c = token[0], int(token[1:])
        numbers.append(c)
        value = {"+": value + c, "-": value - c, "*": value * c}[op] % 10
    return numbers, value


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), lo=st.integers(1, 8), extra=st.integers(0, 4), n=st.integers(1, 12))
def test_pairs_differ_in_one_number_at_the_span(seed, lo, extra, n):
    for p in arithmetic_pairs(n, steps=(lo, lo + extra), seed=seed):
        clean_numbers, clean_answer = parse_and_solve(p.clean_question)
        corrupted_numbers, corrupted_answer = parse_and_solve(p.corrupted_question)
        assert (p.clean_answer, p.corrupted_answer) == (clean_answer, corrupted_answer)
        assert clean_answer != corrupted_answer
        assert lo <= len(clean_numbers) - 1 <= lo + extra
        differing = [i for i, (a, b) in enumerate(zip(clean_numbers, corrupted_numbers)) if a != b]
        assert len(differing) == 1
        start, end = p.change.span
        assert p.clean_question[start:end] == p.change.old
        assert p.corrupted_question == p.clean_question[:start] + p.change.new + p.clean_question[end:]
        # the span is the differing number's own token of the question
        spans = [m.span() for m in re.finditer(r"\d+", p.clean_question)]
        assert spans[differing[0]] == (start, end)
