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
    [ideal] = [line for line in lines if line.startswith("ideal (matmul")]  # the higher of the two measurements
    m = re.match(r"ideal \(matmul in float32 here\): ([0-9.]+) GFLOP/s \(the higher of ([0-9.]+) before the runs and ([0-9.]+) after\)", ideal)
    assert m, ideal
    assert float(m[1]) == max(float(m[2]), float(m[3])) > 0


def test_bench_refuses_bad_arguments():
    with pytest.raises(SystemExit):
        bench_main(["--model", "nonsense"])
    with pytest.raises(SystemExit):
        bench_main(["--checkpoint", "x"])


def test_bench_is_a_module_of_the_checkout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--help"])
    assert exit_info.value.code == 0 and "usage: python -m benchmarks.bench" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_peer_bench(tiny_codi):
    """The tiny Llama-3.2 CODI as the bench builds --model smollm2: the engine's model through `load_codi`,
    the nnsight peer from the same checkpoint and HF model; two pairs traced, the engine's logits of every test."""
    pytest.importorskip("nnsight", reason="the nnsight baseline needs the bench extra: pip install -e '.[bench]'")
    import torch

    from benchmarks.baselines import NnsightCodi
    from benchmarks.bench import run_engine
    from benchmarks.models import bench_pairs
    from interp.loading import load_codi
    from interp.sweep import SweepConfig
    from interp.trace import trace_pair

    _, base, tokenizer, paths = tiny_codi
    state = torch.load(paths["bin"], weights_only=True)
    model = load_codi(state, (base, tokenizer), device="cpu")
    codi = NnsightCodi.from_checkpoint(state, base, tokenizer, num_latents=model.num_latents)
    traces = [trace_pair(model, p) for p in bench_pairs(model, 2)]
    config = SweepConfig(hook="resid_post", strategies=("parallel", "iterative"), kinds=("single", "all"), layers=(0, 2))
    fast_logits: dict = {}
    run_engine("fast", model, traces, config, batch_size=5, keep_logits=fast_logits, compare_logits=None, progress=False)
    return model, codi, traces, config, fast_logits


@pytest.mark.usefixtures("one_thread")
def test_bench_nnsight_peers_agree_with_the_engine(tiny_peer_bench):
    """`nnsight` (one test per trace) and `nnsight (batched)` (batches of 5 units: rows mixing pairs, layers and
    latent sets) run the same tests as bench_main runs them and agree with the engine's scored logits."""
    from benchmarks.bench import NnsightPeer, run_engine

    model, codi, traces, config, fast_logits = tiny_peer_bench
    kwargs = dict(keep_logits={}, compare_logits=fast_logits, progress=False)
    per_test, per_test_diff = run_engine("nnsight", model, traces, config, batch_size=None, patch_one=NnsightPeer(model, codi), **kwargs)
    batched, batched_diff = run_engine("nnsight (batched)", model, traces, config, batch_size=5, patch_batch=NnsightPeer(model, codi).batch, **kwargs)
    assert per_test.tests == batched.tests == len(fast_logits) == 2 * 2 * 7 * 2  # pairs x layers x (6 single + all) x strategies
    assert per_test_diff < 1e-4 and batched_diff < 1e-4


def test_bench_ablation_table(capsys):
    """--ablation reruns the engine's sweep with each shortcut off: one table row each, same answers."""
    result = bench_main(["--model", "tiny", "--device", "cpu", "--pairs", "1", "--layers", "0,1", "--kinds", "single", "--naive-tests", "2", "--ablation", "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("| shortcut off | tests/s | fast is faster by | % of ideal | answer logits vs fast |") + 2 :]
    assert [row.split(" | ")[0] for row in table[:6]] == ["| none (fast)", "| prefix_reuse", "| drafts", "| lookup", "| dedup", "| parallel_skip"]
    assert set(result["ablation"]) == {"prefix_reuse", "drafts", "lookup", "dedup", "parallel_skip"}
    assert all(a["max_abs_diff"] < 1e-4 and a["tests_per_s"] > 0 for a in result["ablation"].values())
