"""The GSM8K pair generator: safe evaluation, hand-checked corruptions, skips and counts, properties."""

from __future__ import annotations

import functools
import json
import math
import operator
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interp.data import gsm8k_pairs
from interp.data.gsm8k import (
    Problem,
    Skipped,
    corrupt_problem,
    evaluate,
    new_values,
    parse_expr,
    question_numbers,
)

GSM8K_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"


def read_rows(split: str = "test") -> list[dict]:
    path = GSM8K_DIR / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K copy not found at {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return read_rows()


@functools.cache
def all_test_rows() -> tuple[dict, ...]:
    """For hypothesis tests (a fixture argument would be printed in full on failure)."""
    return tuple(read_rows())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the safe evaluator


def test_evaluator_does_arithmetic():
    assert evaluate(parse_expr("16-3-4")) == 9
    assert evaluate(parse_expr(" 2*(3+4)**2 ")) == 98
    assert evaluate(parse_expr("7//2 + 7%2 + -3 + +1")) == 2
    assert evaluate(parse_expr("80000*1.5")) == 120000
    assert evaluate(parse_expr("2*.5")) == 1


@pytest.mark.parametrize(
    "text",
    ["__import__('os').system('true')", "x+1", "abs(-2)", "'a'*3", "1,000+1", "1e3", "0x10", "(1)(2)", "2 < 3"],
)
def test_evaluator_refuses_anything_but_arithmetic(text):
    with pytest.raises(ValueError, match="not an arithmetic expression"):
        parse_expr(text)


def test_evaluator_errors():
    with pytest.raises(ZeroDivisionError):
        evaluate(parse_expr("1/(2-2)"))
    with pytest.raises(ValueError, match="exponent"):
        evaluate(parse_expr("10**1000"))
    with pytest.raises(ValueError, match="not real"):
        evaluate(parse_expr("(-8)**0.5"))


# ---------------------------------------------------------------- numbers of the question


def test_question_numbers_formats():
    q = "He pays $80,000, gets 150% back, $4.00 each, 2.5 kg, 1/2 of it at 7:11 on the 3rd day, A1 and 30mph."
    got = [(n.text, n.value, n.percent, n.changeable) for n in question_numbers(q)]
    assert got == [
        ("80,000", 80000.0, False, True),
        ("150", 150.0, True, True),
        ("4.00", 4.0, False, True),  # money with .00 is an integer
        ("2.5", 2.5, False, False),  # decimals are skipped
        ("1", 1.0, False, False),
        ("2", 2.0, False, False),  # a fraction
        ("7", 7.0, False, False),
        ("11", 11.0, False, False),  # a time
        ("3", 3.0, False, False),  # an ordinal
        ("1", 1.0, False, False),  # glued to a letter
        ("30", 30.0, False, True),  # a unit after the number is fine
    ]
    for n in question_numbers(q):
        assert q[n.span[0] : n.span[1]] == n.text


def test_new_values_keep_digit_count_and_trailing_zeros():
    assert new_values(7) == [2, 3, 4, 5, 6, 8, 9]
    assert new_values(1) == list(range(2, 10))
    assert new_values(80000) == [k * 10000 for k in range(1, 10) if k != 8]
    assert new_values(150) == [k * 10 for k in range(10, 100) if k != 15]
    assert new_values(15) == [k for k in range(10, 100) if k != 15]


# ---------------------------------------------------------------- hand-checked real rows


def corrupt_row(rows, index, number_index, new_value):
    return corrupt_problem(rows[index]["question"], rows[index]["answer"], number_index, new_value)


def test_row0_janet(rows):
    # "Janet's ducks lay 16 eggs ... eats three ... with four ... $2 per fresh duck egg"
    # <<16-3-4=9>> <<9*2=18>> #### 18. Numbers: [16, 2]. 16 -> 20: 20-3-4 = 13 eggs, 13*2 = $26.
    c = corrupt_row(rows, 0, 0, 20)
    assert c.corrupted_question.startswith("Janet\u2019s ducks lay 20 eggs per day.")
    assert c.corrupted_question == rows[0]["question"].replace("16", "20")
    assert (c.change.old, c.change.new, c.change.span) == ("16", "20", (18, 20))
    assert (c.clean_answer, c.corrupted_answer) == (18, 26)
    assert [s["corrupted_expr"] for s in c.chain] == ["20-3-4", "13*2"]


def test_row2_josh_commas_and_percent(rows):
    # "$80,000 ... $50,000 in repairs ... increased the value of the house by 150%"
    # <<80000+50000=130000>> <<80000*1.5=120000>> <<120000+80000=200000>> <<200000-130000=70000>>
    # $80,000 -> $60,000: cost 110000, increase 60000*1.5 = 90000, value 150000, profit 40000.
    c = corrupt_row(rows, 2, 0, 60000)
    assert "He buys a house for $60,000 and then" in c.corrupted_question
    assert (c.change.old, c.change.new) == ("80,000", "60,000")
    assert (c.clean_answer, c.corrupted_answer) == (70000, 40000)
    # 150% -> 200%: the chain writes 150% as 1.5, which becomes 2: increase 160000, value 240000,
    # profit 240000 - 130000 = 110000.
    c = corrupt_row(rows, 2, 2, 200)
    assert "by 200%." in c.corrupted_question
    assert [s["corrupted_expr"] for s in c.chain] == ["80000+50000", "80000*2", "160000+80000", "240000-130000"]
    assert c.corrupted_answer == 110000


def test_row3_james(rows):
    # "run 3 sprints 3 times a week ... 60 meters each sprint": <<3*3=9>> <<9*60=540>> #### 540.
    # 60 -> 30: 9*30 = 270. Changing either 3 is ambiguous: the chain's two 3s cannot be told apart.
    c = corrupt_row(rows, 3, 2, 30)
    assert "He runs 30 meters each sprint." in c.corrupted_question
    assert (c.clean_answer, c.corrupted_answer) == (540, 270)
    with pytest.raises(Skipped) as e:
        corrupt_row(rows, 3, 0, 4)
    assert e.value.reason == "ambiguous"


def test_row4_wendi(rows):
    # "three cups ... 15 cups ... 25 cups ... flock is 20 chickens": <<3*20=60>> <<60-15-25=20>> #### 20.
    # 20 -> 30: 3*30 = 90 cups, 90-15-25 = 50 (the 60 is the first result, not a question number).
    c = corrupt_row(rows, 4, 2, 30)
    assert (c.clean_answer, c.corrupted_answer) == (20, 50)
    assert [s["corrupted_expr"] for s in c.chain] == ["3*30", "90-15-25"]
    # 15 -> 12: 60-12-25 = 23.
    assert corrupt_row(rows, 4, 0, 12).corrupted_answer == 23


def test_row6_toulouse(rows):
    # "twice as many sheep as Charleston. Charleston has 4 times as many as Seattle ... Seattle has 20"
    # <<20*4=80>> <<2*80=160>> <<20+160+80=260>>. 4 -> 3: 20*3 = 60, 2*60 = 120, 20+120+60 = 200.
    c = corrupt_row(rows, 6, 0, 3)
    assert "Charleston has 3 times as many sheep" in c.corrupted_question
    assert [s["corrupted_expr"] for s in c.chain] == ["20*3", "2*60", "20+120+60"]
    assert c.corrupted_answer == 200


def test_row7_carla_percent_literal(rows):
    # "200 GB file ... 2 GB/minute ... 40% of the way ... takes 20 minutes"
    # <<200*40*.01=80>> <<80/2=40>> <<200/2=100>> <<40+100+20=160>>. 40% -> 60%: 120 GB, 60 min,
    # 100 min, 60+100+20 = 180 (the last 40 is both "40%" and the result 40; both become 60).
    c = corrupt_row(rows, 7, 2, 60)
    assert [s["corrupted_expr"] for s in c.chain] == ["200*60*.01", "120/2", "200/2", "60+100+20"]
    assert (c.clean_answer, c.corrupted_answer) == (160, 180)


def test_row11_toula(rows):
    # "3 dozen donuts $68 per dozen, 2 dozen cupcakes $80 per dozen, 6 dozen cheesecakes $55"
    # <<3*68=204>> <<2*80=160>> <<6*55=330>> <<204+160+330=694>>. $80 -> $90: 2*90 = 180, total 714.
    c = corrupt_row(rows, 11, 3, 90)
    assert "which cost $90 per dozen" in c.corrupted_question
    assert (c.clean_answer, c.corrupted_answer) == (694, 714)


def test_real_rows_that_are_refused(rows):
    # Row 1: "2 bolts of blue fiber and half that much white": <<2/2=1>>; the 2 may be "half".
    with pytest.raises(Skipped) as e:
        corrupt_row(rows, 1, 0, 4)
    assert e.value.reason == "ambiguous"
    expected = {
        13: "final_mismatch",  # the answer 18 is solved for in prose, after the last annotation (12)
        15: "selection_step",  # "since $125 > $96 ... <<125=125>>": a change could flip the choice
        37: "untraced_literal",  # <<11*15=165>>: 11 comes from algebra the chain does not record
        94: "unannotated_step",  # "180-12 = 168" in prose, then <<168+180=348>>
    }
    for index, reason in expected.items():
        with pytest.raises(Skipped) as e:
            Problem(rows[index]["question"], rows[index]["answer"])
        assert e.value.reason == reason, index


def test_impossible_change_is_a_value_error(rows):
    with pytest.raises(ValueError, match="out of range"):
        corrupt_row(rows, 0, 5, 20)
    with pytest.raises(ValueError, match="other than 16"):
        corrupt_row(rows, 0, 0, 16)
    with pytest.raises(ValueError, match="not a plain integer"):
        corrupt_problem("It costs $1.50 each.", "<<1.5*2=3>>\n#### 3", 0, 2)


# ---------------------------------------------------------------- constructed rows: skips and counts

GOOD = {"question": "Ann has 12 apples and buys 30 more. How many now?", "answer": "12+30=<<12+30=42>>42\n#### 42"}
BROKEN = {
    "no_annotations": {"question": "Bo has 5 cats.", "answer": "He has 5 cats.\n#### 5"},
    "bad_annotation": {"question": "Bo has 5 cats.", "answer": "<<5+x=7>>7\n#### 7"},
    "inconsistent_chain": {"question": "Bo has 5 cats and 4 dogs.", "answer": "<<5+4=10>>10\n#### 10"},
    "final_mismatch": {"question": "Bo has 5 cats and 4 dogs.", "answer": "<<5+4=9>>9\n#### 8"},
    "selection_step": {"question": "Bo has 5 cats and 4 dogs.", "answer": "<<5*2=10>> <<10=10>>\n#### 10"},
    "untraced_literal": {"question": "Bo has 5 cats and 4 dogs.", "answer": "<<5*37=185>>\n#### 185"},
    "unannotated_step": {"question": "Bo has 5 cats and 4 dogs.", "answer": "5+4 = 9, <<9*5=45>>\n#### 45"},
    "no_changeable_number": {"question": "Bo has 1.5 cats.", "answer": "<<1.5*2=3>>\n#### 3"},
    "number_not_in_chain": {"question": "Bo has 5 cats.", "answer": "<<2*2=4>>\n#### 4"},
    "ambiguous": {"question": "Bo has 5 cats and 5 dogs.", "answer": "<<5+5=10>>\n#### 10"},
    "answer_unchanged": {"question": "Bo has 5 cats.", "answer": "<<5*0=0>>\n#### 0"},
    # 13 shared by 1: any other single digit 2..9 leaves fractions of candy
    "not_nice": {"question": "Bo shares thirteen candies with 1 friend.", "answer": "<<13/1=13>>\n#### 13"},
}


def test_broken_rows_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, *BROKEN.values()])
    counts = Counter()
    pairs = gsm8k_pairs(path, counts=counts)
    assert [p.id for p in pairs] == ["gsm8k-test-0"]
    assert (pairs[0].clean_answer, pairs[0].corrupted_answer) != (42, 42)
    for reason in BROKEN:
        assert counts[f"drop.{reason}"] == 1, reason
    assert counts["read"] == 1 + len(BROKEN)
    assert counts["corrupted"] == counts["sampled"] == 1


def test_counts_form_a_funnel(rows, tmp_path):
    counts = Counter()
    pairs = gsm8k_pairs(write_jsonl(tmp_path / "t.jsonl", rows[:150]), counts=counts)
    drops = lambda *names: sum(counts[f"drop.{n}"] for n in names)  # noqa: E731
    problem_drops = drops("no_annotations", "bad_annotation", "inconsistent_chain", "final_mismatch", "selection_step", "untraced_literal", "unannotated_step")
    assert counts["read"] - problem_drops == counts["chain_consistent"]
    assert counts["chain_consistent"] - drops("no_changeable_number", "number_not_in_chain", "ambiguous") == counts["number_traced"]
    assert counts["number_traced"] - drops("answer_unchanged", "not_nice") == counts["corrupted"] == len(pairs)
    assert list(counts)[:3] == ["read", "drop.no_annotations", "drop.bad_annotation"]  # printing order
    assert counts["numbers.seen"] >= counts["numbers.skipped"] > 0


def test_deterministic_seeded_and_sampled(rows, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", rows[:120])
    a, b = gsm8k_pairs(path, seed=0), gsm8k_pairs(path, seed=0)
    assert a == b and len(a) > 30
    other = gsm8k_pairs(path, seed=1)
    assert [p.change for p in other] != [p.change for p in a]
    # a row's pair depends on its index, not on the other rows read
    prefix = gsm8k_pairs(write_jsonl(tmp_path / "prefix.jsonl", rows[:60]), seed=0)
    assert prefix == [p for p in a if int(p.id.split("-")[-1]) < 60]
    sample = gsm8k_pairs(path, seed=0, n=10)
    assert len(sample) == 10 and set(p.id for p in sample) <= set(p.id for p in a)
    assert [p.id for p in sample] == sorted((p.id for p in sample), key=lambda i: int(i.split("-")[-1]))
    assert len(gsm8k_pairs(path, n=10_000)) == len(a)


def test_directory_path_and_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    (pair,) = gsm8k_pairs(tmp_path, split="train")
    assert pair.id == "gsm8k-train-0" and pair.source["split"] == "train"
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        gsm8k_pairs(tmp_path, split="test")
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        gsm8k_pairs(tmp_path / "bad.jsonl")


def test_hub_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match="openai/gsm8k.*Pass path="):
        gsm8k_pairs(None)


# ---------------------------------------------------------------- property: pairs re-evaluate


MUL_OPS = {"*": operator.mul, "/": operator.truediv, "//": operator.floordiv, "%": operator.mod}


def independent_eval(text: str) -> float:
    """A recursive-descent evaluator written separately from interp's: + - * / // % ** ( ) unary."""
    tokens = re.findall(r"\d+\.?\d*|\.\d+|\*\*|//|[-+*/%()]", text)
    assert "".join(tokens) == re.sub(r"\s", "", text), text
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr():
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term():
        value = unary()
        while peek() in MUL_OPS:
            op = take()
            value = MUL_OPS[op](value, unary())
        return value

    def unary():
        if peek() in ("-", "+"):
            return -unary() if take() == "-" else unary()
        return power()

    def power():
        base = atom()
        if peek() != "**":
            return base
        take()
        return base ** unary()

    def atom():
        if take() == "(":
            value = expr()
            assert take() == ")"
            return value
        return float(tokens[pos - 1])

    value = expr()
    assert pos == len(tokens), text
    return value


def number_forms(value: float, percent: bool) -> list[float]:
    if not percent:
        return [value]
    return [value, value / 100, 1 - value / 100, 1 + value / 100, 100 - value, 100 + value]


def check_gsm8k_pair(pair) -> None:
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)  # noqa: E731
    chain, change = pair.source["chain"], pair.change
    start, end = change.span
    assert pair.clean_question == pair.source["question"]
    assert pair.clean_question[start:end] == change.old
    assert pair.corrupted_question == pair.clean_question[:start] + change.new + pair.clean_question[end:]
    old, new = float(change.old.replace(",", "")), float(change.new.replace(",", ""))
    percent = re.match(r"\s?(%|percent)", pair.clean_question[end:]) is not None
    for k, step in enumerate(chain):
        assert close(independent_eval(step["expr"]), step["result"])
        assert close(independent_eval(step["corrupted_expr"]), step["corrupted_result"])
        clean_lits = [float(x) for x in re.findall(r"\d+\.?\d*|\.\d+", step["expr"])]
        new_lits = [float(x) for x in re.findall(r"\d+\.?\d*|\.\d+", step["corrupted_expr"])]
        assert len(clean_lits) == len(new_lits)
        for a, b in zip(clean_lits, new_lits):
            # every literal that is the changed number, or an earlier result, takes its new value
            allowed = [n for o, n in zip(number_forms(old, percent), number_forms(new, percent)) if close(a, o)]
            allowed += [s["corrupted_result"] for s in chain[:k] if close(a, s["result"])]
            assert any(close(b, x) for x in allowed) if allowed else close(a, b), (step, a, b)
    final = float(pair.source["answer"].rpartition("####")[2].strip().replace(",", ""))
    assert close(pair.clean_answer, final) and close(pair.clean_answer, chain[-1]["result"])
    assert pair.corrupted_answer == chain[-1]["corrupted_result"] != pair.clean_answer
    if pair.clean_answer > 0 and pair.clean_answer.is_integer():
        assert pair.corrupted_answer >= 0 and pair.corrupted_answer.is_integer()


@settings(max_examples=25, deadline=None)
@given(data=st.data(), seed=st.integers(0, 10_000))
def test_every_gsm8k_pair_reevaluates(data, seed):
    rows = all_test_rows()
    indices = data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=1, max_size=40, unique=True))
    with tempfile.TemporaryDirectory() as tmp:
        pairs = gsm8k_pairs(write_jsonl(Path(tmp) / "t.jsonl", [rows[i] for i in indices]), seed=seed)
    for pair in pairs:
        check_gsm8k_pair(pair)


def test_full_test_split_pairs_reevaluate(rows):
    start = time.perf_counter()
    counts = Counter()
    pairs = gsm8k_pairs(GSM8K_DIR, split="test", counts=counts)
    assert time.perf_counter() - start < 30
    assert counts["read"] == len(rows) == 1319
    assert len(pairs) > 600  # 808 at the time of writing
    for pair in pairs:
        check_gsm8k_pair(pair)
