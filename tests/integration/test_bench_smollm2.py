"""`python -m benchmarks.bench` on real SmolLM2 weights: the nnsight peer baseline agrees with the engine on every scored logit."""

from __future__ import annotations

import pytest

from benchmarks.bench import bench_main

pytestmark = pytest.mark.slow


def test_nnsight_and_one_at_a_time_agree_with_the_engine(capsys):
    result = bench_main(["--model", "smollm2", "--device", "cpu", "--pairs", "1", "--layers", "3,20", "--kinds", "single", "--naive-tests", "6", "--quiet"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert result["agree"] and result["compare"]["tests"] == 6  # 3 units spread over the 2 x 6 of the sweep, both strategies
    # fp32, logits at scale ~30: the existing 1e-3 tolerance of the SmolLM2 reference tests
    assert result["peer_max_abs_diff"]["nnsight"] < 1e-3 and result["peer_max_abs_diff"]["one-at-a-time"] < 1e-3
    for peer in ("nnsight", "nnsight (batched)", "one-at-a-time"):
        assert any(line.startswith(f"vs {peer}: ") for line in lines)
    assert result["peer_max_abs_diff"]["nnsight (batched)"] < 1e-3 and any(line.startswith("ceiling: ") for line in lines)
    assert lines[-1].startswith("speedup: ")
