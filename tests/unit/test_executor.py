"""Executors: a local Ray instance with 2 CPU workers gives the single-process rows, and a worker killed
mid-run loses nothing and doubles nothing (interp/executor.py)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from interp.executor import LocalExecutor, ModelSpec, RayExecutor, batches

ray = pytest.importorskip("ray", reason="the Ray executor tests need the ray extra: pip install -e '.[ray]'")
# Ray workers cannot import this test module by name: send its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

QUESTIONS = ["7 +5 *3 -2 *7 +4 -1", "3 *7 -4 +9 *3 -1 +2", "0 +8 *9 -3 +1 *7 -6", "9 -1 *3 +4 -8 *9 +5"]
UNITS = [(q, t) for q in range(len(QUESTIONS)) for t in (0, 3, 5)]
SPEC = ModelSpec("embedded", device="cpu")


class Latents:
    """Per unit (question, latent t): the greedy answer and latent t's norm. Keeps each worker's
    generations (per-worker state, as a sweep keeps traces); `delay` seconds per batch."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay, self.fail = delay, fail
        self.seen: dict[int, object] = {}

    def __call__(self, model, batch):
        if self.fail:
            raise ValueError("work_fn failed on purpose")
        time.sleep(self.delay)
        rows = []
        for q, t in batch:
            gen = self.seen.setdefault(q, model.generate(QUESTIONS[q]))
            rows.append([{"question": q, "t": t, "answer_ids": gen.answer_ids.tolist(), "latent_norm": float(gen.latents[t].norm()), "pid": os.getpid()}])
        return rows


pytestmark = pytest.mark.usefixtures("one_thread")  # as each Ray worker has (cpus_per_worker=1)


@pytest.fixture(scope="module")
def local_rows():
    import interp

    out = list(LocalExecutor(interp.load_default("aligned")).map_units(SPEC, UNITS, Latents(), batch_size=2))
    assert [u for u, _ in out] == UNITS
    return dict(out)


@pytest.fixture(scope="module")
def local_ray():
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - any failure to start means Ray cannot run on this machine
        pytest.skip(f"Ray cannot start a local instance on this machine: {exc}")
    yield
    ray.shutdown()


def assert_same_rows(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for unit, rows in want.items():
        [a], [b] = got[unit], rows
        assert a["answer_ids"] == b["answer_ids"], unit
        assert abs(a["latent_norm"] - b["latent_norm"]) < 1e-5 * max(1.0, abs(b["latent_norm"])), unit


def test_ray_matches_local(local_ray, local_rows):
    executor = RayExecutor(workers=2, num_gpus="auto")
    assert executor.num_gpus == 0  # no GPU here: CPU actors
    out = list(executor.map_units(SPEC, UNITS, Latents(), batch_size=2))
    assert sorted(u for u, _ in out) == sorted(UNITS)
    assert len({rows[0]["pid"] for _, rows in out}) == 2  # both workers ran batches
    assert_same_rows(dict(out), local_rows)


def test_killed_worker_loses_nothing(local_ray, local_rows):
    executor = RayExecutor(workers=2)
    out: list = []
    killed = None
    for unit, rows in executor.map_units(SPEC, UNITS, Latents(delay=0.3), batch_size=1):
        out.append((unit, rows))
        if killed is None:  # the worker that answered first has more batches in flight: kill it
            killed = rows[0]["pid"]
            os.kill(killed, signal.SIGKILL)
    units = [u for u, _ in out]
    assert sorted(units) == sorted(UNITS)  # nothing lost, nothing doubled
    pids = [rows[0]["pid"] for _, rows in out]
    assert executor.restarts == 1
    assert pids.count(killed) <= 2 and len(set(pids)) == 3  # a fresh actor took over the dead one's batches (in_flight 2)
    assert_same_rows(dict(out), local_rows)


def test_work_fn_errors_end_the_run(local_ray):
    with pytest.raises(ValueError, match="failed on purpose"):
        list(RayExecutor(workers=1).map_units(SPEC, UNITS[:2], Latents(fail=True)))
    with pytest.raises(ValueError, match="failed on purpose"):
        list(LocalExecutor().map_units(SPEC, UNITS[:2], Latents(fail=True)))


def test_workers_must_fit_the_cluster(local_ray):
    with pytest.raises(ValueError, match="do not fit the Ray cluster"):
        RayExecutor(workers=3)
    with pytest.raises(ValueError, match="do not fit the Ray cluster"):
        RayExecutor(workers=1, num_gpus=1)


def test_arguments():
    assert batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="batch_size"):
        batches([1], 0)
    with pytest.raises(ValueError, match="unknown dtype"):
        ModelSpec(dtype="int8")


class KillOnce:
    """A sweep metric that SIGKILLs the worker process running it the first time it is called in a
    Ray worker (a marker file makes it once per test); elsewhere it adds the pid to the row."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, pt, result) -> dict:
        if os.environ.get("RAY_WORKER_MODE") or "ray" in sys.argv[0] or "default_worker" in " ".join(sys.argv):
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return {"pid": os.getpid()}


def test_sweep_on_ray_equals_the_single_process_sweep_even_when_a_worker_dies(local_ray, tmp_path):
    """run_sweep with 2 Ray workers (one killed mid-sweep) writes exactly the rows of the single-process sweep."""
    import json
    import math

    import interp
    from interp.data import arithmetic_pairs
    from interp.score import default_metrics

    model = interp.load_default("aligned")
    pairs = arithmetic_pairs(4, seed=2)
    config = interp.SweepConfig(kinds=("single", "all"), layers=(1, 3), bootstrap=50)
    metrics = [*default_metrics(config.family), KillOnce(str(tmp_path / "killed"))]
    interp.run_sweep(model, pairs, tmp_path / "local", config, progress=False, metrics=metrics)
    executor = RayExecutor(workers=2)
    interp.run_sweep(model, pairs, tmp_path / "ray", config, progress=False, metrics=metrics, executor=executor, model_spec=SPEC)
    assert (tmp_path / "killed").exists() and executor.restarts == 1
    read = lambda d: [json.loads(line) for line in (tmp_path / d / "results.jsonl").read_text().splitlines()]  # noqa: E731
    local, remote = {r["test_id"]: r for r in read("local")}, read("ray")
    assert len(remote) == len({r["test_id"] for r in remote}) == len(local) == 4 * 2 * 7 * 3  # nothing lost, nothing doubled
    for row in remote:
        want = local[row["test_id"]]
        for key, value in want.items():
            if key == "pid":
                continue
            if isinstance(value, float) and not math.isnan(value):
                assert abs(row[key] - value) <= 1e-5 * max(1.0, abs(value)), (row["test_id"], key)
            elif not isinstance(value, (float, list)):
                assert row[key] == value, (row["test_id"], key)


@pytest.fixture(scope="module")
def other_spec(tmp_path_factory):
    """A ModelSpec of a checkpoint of the embedded model's shape whose weights differ (one bias)."""
    import torch

    from interp.loading import EMBEDDED_DIR, read_state_dict

    state = read_state_dict(EMBEDDED_DIR / "model.safetensors")
    state["prj.ln.bias"] = state["prj.ln.bias"] + 0.01
    path = tmp_path_factory.mktemp("other") / "pytorch_model.bin"
    torch.save(state, path)
    return ModelSpec(str(path), str(EMBEDDED_DIR / "base"), device="cpu")


def test_a_model_that_differs_from_the_drivers_is_refused(local_ray, other_spec):
    import interp
    from interp.runio import RunError, model_fingerprint

    expected = model_fingerprint(interp.load_default("aligned"))
    with pytest.raises(RunError, match=r"the model loaded from model_spec loaded another model than this process, differing in checkpoint\."):
        list(LocalExecutor().map_units(other_spec, UNITS, Latents(), fingerprint=expected))
    with pytest.raises(RunError, match=r"^Ray worker \d+ loaded another model than this process, differing in checkpoint\."):
        list(RayExecutor(workers=1).map_units(other_spec, UNITS, Latents(), fingerprint=expected))
    assert len(list(RayExecutor(workers=1).map_units(SPEC, UNITS[:2], Latents(), fingerprint=expected))) == 2  # the same model passes
