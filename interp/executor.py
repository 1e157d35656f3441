"""Executors: where a sweep's units of work run. One process (`LocalExecutor`) or Ray actors (`RayExecutor`).

Contract (both executors):
- `map_units(model_spec, units, work_fn, batch_size=b)` splits `units` (in the given order) into
  batches of up to `b`, runs `work_fn(model, batch) -> rows per unit` on a model loaded from
  `model_spec`, and yields `(unit, rows)` for every unit exactly once, as batches complete
  (`LocalExecutor`: in order; `RayExecutor`: in completion order).
- The caller (the driver) is the only writer: executors return rows, they write nothing.
- `work_fn` is sent to each worker once; a callable object may keep per-worker state between
  batches (e.g. the traces of the pairs it has seen). An exception raised by `work_fn` ends the run.

`RayExecutor` fault tolerance: each actor loads the model once. When an actor dies (killed, node lost,
out of memory), every batch in flight on it is re-queued on a fresh actor; a result is yielded only
from a batch that completed, so nothing is lost or doubled. A batch that kills `max_attempts`
workers in a row is a bug or an out-of-memory, not bad luck: the run stops with its last error.

Pointing at an existing Ray cluster: start it with `ray start --head` on one machine and
`ray start --address=HEAD:6379` on the others, every node with the same environment (`interp`
installed, and the checkpoint path readable at the same place), then pass `address="HEAD:6379"`
(or `"auto"` on a cluster node). Without an address a local Ray instance is started.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

if TYPE_CHECKING:
    from interp.model import LatentModel

U = TypeVar("U")
Rows = list[dict[str, Any]]
WorkFn = Callable[["LatentModel", list[U]], Sequence[Rows]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model: small and picklable, unlike the model.

    checkpoint: "embedded" (the aligned model: interp.load_default("aligned")), "shipped:NAME" (interp.load_shipped), a hub id or a path a worker can read (directory or
    file of a CODI or Coconut checkpoint: `interp.load_model` picks the family); `base` a hub id or
    local directory (None: the CODI release's default). device "auto": CUDA when the worker sees a
    GPU, else CPU. `lora_alpha` and `remove_eos` are CODI's options: None leaves the loader's
    default (32, True), and a Coconut checkpoint refuses them when given.
    """

    checkpoint: str = "embedded"
    base: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    lora_alpha: float | None = None
    num_latents: int = 6
    remove_eos: bool | None = None
    revision: str | None = None
    base_revision: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {sorted(DTYPES)}")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def load(self) -> LatentModel:
        """The model: the one place the CLI and the Ray workers load one."""
        from interp.loading import load_default, load_model
        from interp.shipped import load_shipped

        dtype, device = DTYPES[self.dtype], self.resolved_device()
        if self.checkpoint == "embedded":
            return load_default("aligned", dtype=dtype, device=device)
        if self.checkpoint.startswith("shipped:"):
            return load_shipped(self.checkpoint.removeprefix("shipped:"), dtype=dtype, device=device)
        codi_only = {"lora_alpha": self.lora_alpha, "remove_eos": self.remove_eos}
        options = {k: v for k, v in codi_only.items() if v is not None}
        return load_model(self.checkpoint, self.base, num_latents=self.num_latents, revision=self.revision, base_revision=self.base_revision, dtype=dtype, device=device, **options)


def check_same_model(expected: dict[str, Any] | None, got: dict[str, Any], who: str) -> None:
    """Refuse a worker's model whose fingerprint (`interp.runio.model_fingerprint`) differs from the
    driver's in anything but the device type: RunError naming the fields."""
    from interp.runio import RunError, fingerprint_diff

    if expected is None:
        return
    diff = fingerprint_diff({**expected, "device_type": None}, {**got, "device_type": None})
    if diff:
        raise RunError(f"{who} loaded another model than this process, differing in {', '.join(diff)}; give the workers the same checkpoint, base and options (ModelSpec) as the model of the run")


def batches(units: Sequence[U], batch_size: int) -> list[list[U]]:
    """`units` in order, cut into consecutive batches of up to `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(units[i : i + batch_size]) for i in range(0, len(units), batch_size)]


def _run_batch(work_fn: WorkFn, model: LatentModel, batch: list[U]) -> list[Rows]:
    rows = list(work_fn(model, batch))
    if len(rows) != len(batch):
        raise ValueError(f"work_fn returned rows for {len(rows)} units, expected {len(batch)} (one list of rows per unit)")
    return rows


class LocalExecutor(Generic[U]):
    """Runs every batch in this process, in order. `model`: an already loaded model used for every call
    instead of loading one from the spec (what a single-process sweep has at hand)."""

    def __init__(self, model: LatentModel | None = None):
        self.model = model

    def map_units(self, model_spec: ModelSpec, units: Sequence[U], work_fn: WorkFn, *, batch_size: int = 1, fingerprint: dict[str, Any] | None = None) -> Iterator[tuple[U, Rows]]:
        """`work_fn` on each batch; a model loaded from `model_spec` must have `fingerprint` (when given)."""
        from interp.runio import model_fingerprint

        work = batches(units, batch_size)
        if not work:
            return
        model = self.model
        if model is None:
            model = model_spec.load()
            check_same_model(fingerprint, model_fingerprint(model), "the model loaded from model_spec")
        for batch in work:
            yield from zip(batch, _run_batch(work_fn, model, batch))


class _Worker:
    """The body of a Ray actor: loads the model once, then runs batches."""

    def __init__(self, model_spec: ModelSpec, work_fn: WorkFn, threads: int):
        torch.set_num_threads(threads)
        self.model = model_spec.load()
        self.work_fn = work_fn

    def pid(self) -> int:
        return os.getpid()

    def fingerprint(self) -> dict[str, Any]:
        from interp.runio import model_fingerprint

        return model_fingerprint(self.model)

    def run(self, batch: list) -> list[Rows]:
        return _run_batch(self.work_fn, self.model, batch)


class RayExecutor(Generic[U]):
    """Batches over `workers` Ray actors, each loading the model once.

    address: a Ray cluster address (None: start a local instance unless Ray is already initialised in
    this process); num_gpus: GPUs per actor, "auto" = 1 when the cluster has GPUs, else 0 (CPU actors);
    cpus_per_worker: CPUs per actor (and its torch threads); in_flight: batches queued per actor so it
    never waits for the driver; max_attempts: workers a batch may lose before the run stops;
    init_kwargs: extra `ray.init` arguments (e.g. num_cpus for a local instance, runtime_env).
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int = 2,
        num_gpus: float | str = "auto",
        *,
        cpus_per_worker: int = 1,
        in_flight: int = 2,
        max_attempts: int = 3,
        init_kwargs: dict[str, Any] | None = None,
    ):
        try:
            import ray
        except ImportError:
            raise ImportError("RayExecutor needs Ray: pip install 'interp[ray]' (or pip install 'ray[default]')") from None
        if workers < 1 or in_flight < 1 or max_attempts < 1 or cpus_per_worker < 1:
            raise ValueError(f"workers, in_flight, max_attempts and cpus_per_worker must be >= 1 (got {workers}, {in_flight}, {max_attempts}, {cpus_per_worker})")
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, **(init_kwargs or {}))
        gpus = ray.cluster_resources().get("GPU", 0)
        if num_gpus == "auto":
            num_gpus = 1 if gpus >= 1 else 0
        if not isinstance(num_gpus, (int, float)) or num_gpus < 0:
            raise ValueError(f"num_gpus must be 'auto' or a number >= 0, got {num_gpus!r}")
        cpus = ray.cluster_resources().get("CPU", 0)
        if workers * num_gpus > gpus or workers * cpus_per_worker > cpus:  # more would wait forever for resources
            raise ValueError(f"{workers} workers x ({cpus_per_worker} CPUs, {num_gpus} GPUs) do not fit the Ray cluster ({cpus:g} CPUs, {gpus:g} GPUs); use fewer --workers or add nodes")
        self.ray = ray
        self.workers, self.num_gpus, self.cpus_per_worker = workers, num_gpus, cpus_per_worker
        self.in_flight, self.max_attempts = in_flight, max_attempts
        self._actor_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=num_gpus, max_restarts=0)(_Worker)
        #: actors replaced after dying, over this executor's life
        self.restarts = 0

    def _spawn(self, model_spec: ModelSpec, work_fn_ref: Any) -> Any:
        spec = replace(model_spec, device="cuda" if self.num_gpus > 0 else "cpu") if model_spec.device == "auto" else model_spec
        if spec.device.startswith("cuda") and self.num_gpus == 0:
            raise ValueError(f"model_spec.device is {spec.device!r} but the workers have no GPU (num_gpus=0); use device 'auto' or 'cpu'")
        return self._actor_cls.remote(spec, work_fn_ref, self.cpus_per_worker)

    def map_units(self, model_spec: ModelSpec, units: Sequence[U], work_fn: WorkFn, *, batch_size: int = 1, fingerprint: dict[str, Any] | None = None) -> Iterator[tuple[U, Rows]]:
        """`work_fn` on each batch, on the actors; every actor's model must have `fingerprint` (when given)."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        ray = self.ray
        queue: deque[tuple[int, list[U]]] = deque(enumerate(batches(units, batch_size)))
        if not queue:
            return
        work_fn_ref = ray.put(work_fn)
        actors = [self._spawn(model_spec, work_fn_ref) for _ in range(min(self.workers, len(queue)))]

        def check(new: list[Any]) -> None:  # a model that fails to load fails here, once; one that differs is refused
            for actor, got in zip(new, ray.get([a.fingerprint.remote() for a in new])):
                check_same_model(fingerprint, got, f"Ray worker {ray.get(actor.pid.remote())}")

        try:
            check(actors)
        except BaseException:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise
        generation = [0] * len(actors)  # bumped when a slot's actor is replaced
        load = [0] * len(actors)  # batches in flight on each slot's current actor
        pending: dict[Any, tuple[int, int, int, list[U]]] = {}  # ref -> (slot, generation, batch index, batch)
        attempts: dict[int, int] = {}

        def fill() -> None:
            for slot in sorted(range(len(actors)), key=lambda s: load[s]):
                while queue and load[slot] < self.in_flight:
                    index, batch = queue.popleft()
                    pending[actors[slot].run.remote(batch)] = (slot, generation[slot], index, batch)
                    load[slot] += 1

        try:
            fill()
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                slot, gen, index, batch = pending.pop(ref)
                current = gen == generation[slot]
                if current:
                    load[slot] -= 1
                try:
                    rows = ray.get(ref)
                except (RayActorError, ActorUnavailableError) as exc:
                    attempts[index] = attempts.get(index, 0) + 1
                    if attempts[index] >= self.max_attempts:
                        raise RuntimeError(f"a batch of {len(batch)} units lost {attempts[index]} workers; last error: {exc}") from exc
                    queue.appendleft((index, batch))
                    if current:  # the first failure seen from this actor: a fresh one takes its slot
                        ray.kill(actors[slot], no_restart=True)
                        actors[slot] = self._spawn(model_spec, work_fn_ref)
                        check([actors[slot]])
                        generation[slot] += 1
                        load[slot] = 0
                        self.restarts += 1
                    fill()
                    continue
                yield from zip(batch, rows)
                fill()
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
