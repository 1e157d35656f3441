"""The versioned pairs file: round trip, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from interp.data import NumberChange, Pair, arithmetic_pairs, load_pairs, save_pairs

PAIR = Pair(
    id="gsm8k-test-0",
    clean_question="Janet has 16 eggs.",
    corrupted_question="Janet has 20 eggs.",
    clean_answer=18.0,
    corrupted_answer=26.0,
    change=NumberChange("16", "20", (10, 12)),
    source={"dataset": "gsm8k", "chain": [{"expr": "16-3-4", "result": 9.0}]},
)


def test_round_trip(tmp_path):
    pairs = [PAIR, *arithmetic_pairs(5, seed=1)]
    meta = {"source": "gsm8k", "seed": 0, "counts": Counter({"read": 3, "corrupted": 1})}
    path = tmp_path / "pairs.json"
    save_pairs(path, pairs, meta)
    loaded, loaded_meta = load_pairs(path)
    assert loaded == pairs
    assert loaded_meta == {"source": "gsm8k", "seed": 0, "counts": {"read": 3, "corrupted": 1}}
    data = json.loads(path.read_text())
    assert (data["format"], data["version"]) == ("interp-pairs", 1)
    assert data["pairs"][0]["change"] == {"old": "16", "new": "20", "span": [10, 12]}


def test_write_is_atomic(tmp_path):
    path = tmp_path / "pairs.json"
    save_pairs(path, [PAIR], {"run": 1})
    save_pairs(path, [PAIR, PAIR], {"run": 2})  # replaces the file
    assert load_pairs(path)[1] == {"run": 2}
    with pytest.raises(ValueError, match="not plain finite JSON"):
        save_pairs(path, [PAIR], {"run": object()})
    with pytest.raises(ValueError, match="not plain finite JSON"):
        save_pairs(path, [Pair("nan", "a 1", "a 2", float("nan"), 1.0, NumberChange("1", "2", (2, 3)))], {})
    assert load_pairs(path)[1] == {"run": 2}  # a failed save leaves the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.json"]  # and no temporary file


def test_save_refuses_equal_answers(tmp_path):
    same = Pair("same", "a 1", "a 2", 3.0, 3.0, NumberChange("1", "2", (2, 3)))
    with pytest.raises(ValueError, match="pair #1 .'same'. has equal answers"):
        save_pairs(tmp_path / "p.json", [PAIR, same], {})


def write(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def good_file() -> dict:
    return {"format": "interp-pairs", "version": 1, "meta": {}, "pairs": [PAIR.to_dict()]}


def edited(**changes) -> dict:
    data = good_file()
    data.update(changes)
    return data


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize(
    "data, message",
    [
        ("{not json", r"is not JSON .*regenerate it with interp.data.save_pairs"),
        ("[1, 2]", r"not a pairs file: format tag 'list'"),
        (edited(format="other-pairs"), r"format tag 'other-pairs', expected 'interp-pairs'; regenerate"),
        (without(good_file(), "version"), r"has no 'version'; this code reads version 1, regenerate"),
        (edited(version=2), r"has version 2; this code reads version 1, regenerate"),
        (edited(version="1"), r"has version '1'; this code reads version 1"),
        (edited(pairs={"a": 1}), r"needs a 'meta' object and a 'pairs' list"),
        (edited(pairs=[without(PAIR.to_dict(), "corrupted_answer")]), r"pair #0 \('gsm8k-test-0'\) in .* is missing field\(s\) corrupted_answer; regenerate"),
        (edited(pairs=[{**PAIR.to_dict(), "change": {"old": "16", "new": "20"}}]), r"missing field\(s\) change.span"),
        (edited(pairs=[{**PAIR.to_dict(), "clean_answer": "many"}]), r"pair #0 .* has a malformed field"),
        (edited(pairs=[[1]]), r"pair #0 in .* is not an object"),
        (edited(pairs=[{**PAIR.to_dict(), "corrupted_answer": 18}]), r"pair #0 .* has equal clean and corrupted answers \(18\); a pair must change the answer"),
    ],
)
def test_load_errors_name_the_problem_and_the_fix(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        load_pairs(write(tmp_path, data))
