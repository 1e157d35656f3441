"""Bad input files get one line and exit status 2, never a traceback or garbage rows; reports never write.

On the embedded model (context of 64 positions, 6 latents).
"""

from __future__ import annotations

import json

import pytest

from interp.cli import main
from interp.data import save_pairs
from interp.data.arithmetic import arithmetic_pairs
from interp.plots import load_results
from interp.stats import summarize
from interp.sweep import SweepConfig
from tests.factories import on_aligned


def fails(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(on_aligned(args))
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return info.value.code, err.rstrip("\n")


def pairs_file(tmp_path, records: list[dict]) -> str:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"format": "interp-pairs", "version": 1, "meta": {}, "pairs": records}))
    return str(path)


def good(**changes) -> dict:
    record = arithmetic_pairs(1, seed=3)[0].to_dict()
    record.update(changes)
    return record


def test_empty_pairs_file(tmp_path, capsys):
    path = tmp_path / "pairs.json"
    save_pairs(path, [], {})
    assert fails(["patch", "--pairs", str(path), "--out", str(tmp_path / "run")], capsys) == (2, "error: --pairs: no pairs; accepted: a pairs file with at least one pair (interp pairs writes one)")
    assert not (tmp_path / "run").exists()


def test_non_finite_answer(tmp_path, capsys):
    path = tmp_path / "pairs.json"
    text = json.dumps({"format": "interp-pairs", "version": 1, "meta": {}, "pairs": [good(id="inf", clean_answer=7)]}).replace('"clean_answer": 7', '"clean_answer": Infinity')
    path.write_text(text)
    code, err = fails(["patch", "--pairs", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "pair 'inf'" in err and "finite" in err, err
    assert not (tmp_path / "run").exists()


def test_duplicate_pair_ids(tmp_path, capsys):
    path = pairs_file(tmp_path, [good(id="p"), good(id="p")])
    assert fails(["patch", "--pairs", path, "--out", str(tmp_path / "run")], capsys) == (2, "error: --pairs: pair id 'p' occurs 2 times; accepted: unique pair ids")
    assert not (tmp_path / "run").exists()


def test_pair_whose_prompts_tokenize_identically(tmp_path, capsys):
    record = good(id="same")
    record["corrupted_question"] = record["clean_question"]
    path = pairs_file(tmp_path, [good(id="ok"), record])
    message = (
        "error: --pairs: 1 of 2 pairs cannot be patched on this model; first: pair 'same': its prompts do not align under "
        "the model's tokenizer (same_tokens); accepted: prompts of equal token length differing only in the changed number"
    )
    assert fails(["patch", "--pairs", path, "--out", str(tmp_path / "run")], capsys) == (2, message)
    assert not (tmp_path / "run").exists()


def test_question_longer_than_the_context(tmp_path, capsys):
    record = good(id="long")
    pad = " +1" * 40
    record["clean_question"] += pad
    record["corrupted_question"] += pad
    path = pairs_file(tmp_path, [record])
    code, err = fails(["patch", "--pairs", path, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.startswith("error: --pairs: 1 of 1 pairs cannot be patched on this model; first: pair 'long': the question needs ")
    assert err.endswith("more than the model's context of 64: shorten the question or decode fewer tokens; accepted: shorter questions")
    assert not (tmp_path / "run").exists()


def test_generate_refuses_an_empty_or_too_long_question_in_one_line(capsys):
    """Before the fix an empty question decoded garbage and a long one ended in an IndexError inside TransformerLens."""
    code, err = fails(["generate", "   "], capsys)
    assert (code, err) == (2, "error: empty question ('   '): give the text of a problem")
    code, err = fails(["generate", "1 +2" + " +2" * 40], capsys)
    assert code == 2 and err.startswith("error: the question needs ") and err.endswith("more than the model's context of 64: shorten the question or decode fewer tokens")
    from interp import load_default

    with pytest.raises(ValueError, match=r"^the question needs \d+ positions \(\d+ question tokens, 6 thoughts, the answer and 0 decoded tokens\)"):
        load_default("aligned").run_with_cache("1 +2" + " +2" * 40)


ROW = {"pair_id": "p0", "strategy": "parallel", "kind": "all", "layer": 0, "latents": [0], "hook": "h", "normalized_effect": 0.5, "logit_diff": 1.0, "kl": None, "flip": True}


def test_summary_counts_a_repeated_test_id_once_with_a_warning():
    rows = [{**ROW, "test_id": "a"}, {**ROW, "test_id": "a", "normalized_effect": 9.0}, {**ROW, "test_id": "b", "pair_id": "p1", "normalized_effect": 0.7}]
    with pytest.warns(UserWarning, match=r"^1 repeated test id\(s\) and 0 repeated validity pair id\(s\) ignored: each counts once \(its first row\)$"):
        summary = summarize(rows, [], SweepConfig(bootstrap=50))
    assert summary["n_tests"] == 2
    cell = summary["cells"][0]
    assert cell["normalized_effect"]["mean"] == pytest.approx(0.6) and cell["kl"]["n"] == 0  # null metrics leave the cell's n


def test_report_never_modifies_results(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({**ROW, "test_id": f"{t}|{s}", "pair_id": t, "strategy": s}) for t in ("a", "b") for s in ("parallel", "iterative")]
    data = ("\n".join([*lines, lines[0]]) + "\n" + lines[1][:20]).encode()  # a repeated id and a torn tail
    (run / "results.jsonl").write_bytes(data)
    with pytest.warns(UserWarning, match="1 repeated test id"):
        assert len(load_results(run)) == 4
    main(on_aligned(["report", str(run), "--no-png"]))
    assert (run / "results.jsonl").read_bytes() == data
    assert sorted(p.name for p in run.iterdir()) == ["report.html", "results.jsonl"]
