"""`python -m benchmarks.bench` on the tiny random model: runs the engine and its baselines, agrees, and ends with the parseable line."""

from __future__ import annotations

import re

import pytest

from benchmarks.bench import bench_main

LAST_LINE = re.compile(r"^speedup: (?P<ratio>[0-9.]+)x, max abs diff: (?P<diff>[0-9.]+(?:e[+-]?[0-9]+)?)$")


def test_bench_runs_and_its_last_line_parses(capsys):
    result = bench_main(["--model", "tiny", "--device", "cpu", "--pairs", "1", "--layers", "1", "--kinds", "all", "--quiet"])
    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    assert float(m["diff"]) < 1e-4 and float(m["ratio"]) > 0
    assert result["agree"] and result["compare"]["tests"] == 2 and result["compare"]["answers_differ"] == 0
    assert any(line.startswith("results agree") for line in lines)
    assert any("tests/s" in line and line.lstrip().startswith("naive:") for line in lines)
    assert any(line.startswith("vs one-at-a-time: ") for line in lines) and result["peer_max_abs_diff"]["one-at-a-time"] < 1e-4
    assert any(line.startswith("nnsight baseline not run: ") for line in lines)  # a random model has no HF twin
    assert any(line.startswith("memory: peak RSS") for line in lines)


def test_bench_refuses_bad_arguments():
    with pytest.raises(SystemExit):
        bench_main(["--model", "nonsense"])
    with pytest.raises(SystemExit):
        bench_main(["--checkpoint", "x"])


def test_bench_is_a_module_of_the_checkout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--help"])
    assert exit_info.value.code == 0 and "usage: python -m benchmarks.bench" in capsys.readouterr().out
