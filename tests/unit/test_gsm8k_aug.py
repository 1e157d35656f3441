"""GSM8K-Aug in the iCoT text format: GSM8K's annotations become the steps, the text round-trips,
Coconut's own parser reads what we write, and malformed lines are refused naming the line.
The shared GSM8K files are read from ../shared/data/gsm8k, never copied."""

from __future__ import annotations

import re

import pytest

from interp.data import gsm8k_to_icot, read_icot, write_icot
from interp.data.gsm8k import read_gsm8k
from tests.conftest import GSM8K_DIR

JANET = {"steps": ["<<16-3-4=9>>", "<<9*2=18>>"], "answer": "18"}


@pytest.fixture(scope="module")
def test_split() -> list[dict]:
    return gsm8k_to_icot(read_gsm8k(GSM8K_DIR, "test"))


def official_parse(line: str) -> dict:
    """Coconut's preprocessing/gsm_icot.py, for one line."""
    return {"question": line.split("||")[0], "steps": line.split("||")[1].split("##")[0].strip().split(" "), "answer": line.split("##")[-1].strip()}


def test_gsm8k_annotations_become_the_steps(test_split):
    assert len(test_split) == 1319
    janet = test_split[0]
    assert janet["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.") and {k: janet[k] for k in ("steps", "answer")} == JANET
    no_steps = [r for r in test_split if not r["steps"]]
    assert len(no_steps) == 18 and no_steps[0]["question"].startswith("Kyle bought last year's best-selling book") and no_steps[0]["answer"] == "26"
    assert sum("," in r["answer"] for r in test_split) == 14  # answers stay as GSM8K writes them ("1,000")
    assert len(gsm8k_to_icot(read_gsm8k(GSM8K_DIR, "train"))) == 7473


def test_write_then_read_round_trips_and_coconut_reads_it(test_split, tmp_path):
    path = tmp_path / "gsm_test.txt"
    write_icot(path, test_split)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].endswith("||<<16-3-4=9>> <<9*2=18>> #### 18")
    assert any(line.endswith("|| #### 26") and line.startswith("Kyle bought") for line in lines)
    assert read_icot(path) == test_split
    for line, record in zip(lines, test_split):
        expected = {**record, "steps": record["steps"] or [""]}  # the official split gives [""] for no steps
        assert official_parse(line) == expected


def write_lines(tmp_path, *lines: str):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(["Q one?||<<1+1=2>> #### 2", *lines]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        ("Q two? <<1+1=2>> #### 2", r"has 0 '\|\|' separators, expected one between question and steps"),
        ("Q||two?||<<1+1=2>> #### 2", r"has 2 '\|\|' separators"),
        ("Q two?||<<1+1=2>> 2", r"has 0 '####' after the '\|\|', expected one before the answer"),
        ("Q two?||<<1+1=2>> #### ", r"has an empty answer"),
        ("||<<1+1=2>> #### 2", r"has an empty question"),
        ("Q two?||1+1=2 #### 2", r"step '1\+1=2' is not one <<expr=result>> annotation"),
        ("Q two?||<<1+1=2>>  <<2*3=6>> #### 6", r"step '' is not one <<expr=result>> annotation without whitespace \(steps are separated by single spaces\)"),
    ],
)
def test_a_malformed_line_is_refused_naming_its_line_number(tmp_path, line, message):
    path = write_lines(tmp_path, "", line)  # line 3: blank lines are skipped but counted
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3 {message}") as e:
        read_icot(path)
    assert "\n" not in str(e.value)


def test_a_bad_record_is_not_written(tmp_path):
    path = tmp_path / "out.txt"
    write_icot(path, [{"question": "Q?", **JANET}])
    for record, message in [
        ({"question": "Q?", "steps": ["<<1 + 1=2>>"], "answer": "2"}, r"record #1 step '<<1 \+ 1=2>>' is not one <<expr=result>> annotation without whitespace"),
        ({"question": "Q?", "steps": [], "answer": "#2"}, r"record #1 has answer '#2': it must be stripped non-empty text without '#'"),
        ({"question": "Q||?", "steps": [], "answer": "2"}, r"record #1 has question 'Q\|\|\?'"),
        ({"question": "Q?", "answer": "2"}, r"record #1 is not a record with 'question', 'steps' and 'answer'"),
    ]:
        with pytest.raises(ValueError, match=rf"cannot write {re.escape(str(path))}: {message}"):
            write_icot(path, [{"question": "Q?", **JANET}, record])
    assert read_icot(path) == [{"question": "Q?", **JANET}]  # the old file stays
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # and no temporary file


def test_a_gsm8k_row_without_an_answer_is_refused():
    with pytest.raises(ValueError, match=r"GSM8K row #1 has no answer after '####'"):
        gsm8k_to_icot([{"question": "Q?", "answer": "1+1=<<1+1=2>>2\n#### 2"}, {"question": "Q?", "answer": "no answer"}])
