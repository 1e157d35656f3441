"""Patching sweeps over pairs x layers x latent sets x strategies: resumable, with validity checks.

`sweep(model, pairs, config)` runs a grid in memory and returns its rows as a pandas DataFrame (as
TransformerLens's `generic_activation_patch` returns a tensor); `run_sweep` is the same work with a
run directory, which holds:
- `results.jsonl`: one row per patch test (schema below), appended atomically per unit of work
  (one pair, one hook, one latent set, both strategies), so an interrupted run resumes with no
  finished test lost or repeated.
- `validity.jsonl`: one row per pair with the three validity checks.
- `summary.json`: means with bootstrap 95% CIs across pairs per (strategy, kind, layer, latents),
  iterative-minus-parallel paired differences, the failed validity checks, and a verdict.
- `run.json`: config, versions, seed, model and pairs provenance.

Modules: what runs (`interp.plan`), tracing (`interp.trace`), the engine (`interp.engine`), scoring
and the row schema (`interp.score`, documented in results/README.md), aggregation (`interp.stats`),
run-directory I/O (`interp.runio`). This module checks a sweep, then drives the engine unit by unit.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.data.pairs import Pair, save_pairs
from interp.engine import MAX_ROWS, STRATEGIES, BatchPatcher, EngineOptions, Job, check_hook
from interp.executor import LocalExecutor
from interp.hooks import layer_of
from interp.interventions import INTERVENTIONS, Intervention, Mean
from interp.layout import MAX_NEW_TOKENS
from interp.metrics import first_difference
from interp.model import LatentModel
from interp.patching import latent_sites
from interp.plan import KINDS, Unit, batch_order, units
from interp.runio import RESULTS, VALIDITY, Run, UsageError, check_output_dir, finite, model_fingerprint, open_run, pairs_sha256, read_jsonl, versions
from interp.score import Metric, default_metrics, unit_rows, validity_checks
from interp.stats import summarize
from interp.trace import PairTraces, similarity_positions, trace_pair

HOOK_FAMILIES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
#: the engine batches the units of up to this many pairs together (their traces are held meanwhile)
MAX_GROUP_PAIRS = 16


class ConfigError(UsageError):
    """A sweep that cannot run as configured, naming the `SweepConfig` field (or the pairs) at fault.

    `str()` names the field as the library sees it (`SweepConfig.layers (0, 0): 0 is listed twice`);
    the CLI shows the same message with its flag instead (`--layers 0,0: ...`, see `FLAGS`).
    """

    def __init__(self, field: str, detail: str, value: str | None = None):
        self.field, self.detail, self.value = field, detail, value
        super().__init__(self.message(f"SweepConfig.{field}" if field != "pairs" else "pairs"))

    def message(self, name: str) -> str:
        return f"{name} {self.value}: {self.detail}" if self.value is not None else f"{name}: {self.detail}"


#: the CLI flag of each field `ConfigError` may name
FLAGS = {
    "intervention": "--intervention",
    "strategies": "--strategy",
    "kinds": "--kinds",
    "layers": "--layers",
    "hook": "--hook",
    "num_latents": "--num-latents",
    "pairs": "--pairs",
    "method": "--method",
    "top_k": "--top-k",
}


@dataclass
class SweepConfig:
    """What a sweep runs. `hook` is a family (`resid_post`) or a template (`blocks.{L}.attn.hook_z`)."""

    hook: str = "resid_post"
    strategies: tuple[str, ...] = STRATEGIES
    kinds: tuple[str, ...] = KINDS
    layers: tuple[int, ...] | None = None
    seed: int = 0
    bootstrap: int = 2000
    #: what is written at the sites: "clean" (activation patching), "mean" (the mean activation of the
    #: swept hook at the same named position over every pair's clean run) or "zero"
    intervention: str = "clean"

    def hook_name(self, layer: int) -> str:
        template = self.hook if "{L}" in self.hook else f"blocks.{{L}}.hook_{self.hook}"
        return template.format(L=layer)

    @property
    def family(self) -> str:
        """The hook suffix compared by the similarity metrics (`hook_resid_post`, `attn.hook_z`)."""
        return self.hook_name(0).split(".", 2)[2]


def sweep_patcher(model: LatentModel, group: Sequence[PairTraces], config: SweepConfig, batch_size: int | None = None, options: EngineOptions | None = None) -> BatchPatcher:
    """The engine over a group of pairs, recording what the default metrics read (the family at the similarity positions)."""
    positions = [similarity_positions(pt.corrupted)[0] for pt in group]
    return BatchPatcher(model, [(pt.corrupted, pt.clean) for pt in group], capture=config.family, capture_positions=positions, batch_size=batch_size, options=options)


def run_units(
    patcher: BatchPatcher,
    group: Sequence[PairTraces],
    batch: Sequence[tuple[int, Unit]],
    config: SweepConfig,
    intervention: Intervention,
    metrics: Sequence[Metric],
) -> list[list[dict[str, Any]]]:
    """The rows of each (index in group, unit) item, every strategy, through the engine."""
    jobs = [Job((latent_sites(group[g].corrupted, config.hook_name(u.layer), u.latents),), s, pair=g, intervention=intervention) for g, u in batch for s in config.strategies]
    results = iter(patcher.run(jobs))
    return [unit_rows(group[g], u, config.hook_name(u.layer), {s: next(results) for s in config.strategies}, metrics, family=config.family, intervention=intervention) for g, u in batch]


def sweep_intervention(model: LatentModel, pairs: Sequence[Pair], config: SweepConfig, progress: bool = True) -> Intervention:
    """The sweep's intervention; "mean" averages the swept hooks over every pair's clean run (lean traces)."""
    if config.intervention != "mean":
        return INTERVENTIONS[config.intervention]()
    layers = config.layers if config.layers is not None else range(model.cfg.n_layers)
    names = [config.hook_name(layer) for layer in layers]
    return Mean([model.trace(p.clean_question, names_filter=names) for p in tqdm(pairs, desc="mean activations", disable=not progress)])


# ----------------------------------------------------------------------------- the sweep


def check_sweep(model: LatentModel, pairs: Sequence[Pair], config: SweepConfig) -> None:
    """Refuse, before anything is written, a sweep that cannot run as asked: UsageError, one line.

    Checked: the intervention, strategies and kinds (known, each once), the layers (in range, each once),
    the hook of every layer (a TransformerLens hook that can be patched), the pairs (at least one,
    unique ids, finite and different answers, prompts that align token by token under the model's
    tokenizer, answers told apart by a token, every sequence within the model's context).
    """

    def listed(field: str, values: Sequence[Any], accepted: Sequence[Any]) -> None:
        shown = ",".join(map(str, values))
        if not values:
            raise ConfigError(field, f"is empty; accepted: one or more of {','.join(map(str, accepted))}")
        unknown = [v for v in values if v not in accepted]
        if unknown:
            raise ConfigError(field, f"{unknown[0]!r} is not valid; accepted: {','.join(map(str, accepted))}", shown)
        repeated = sorted({v for v in values if list(values).count(v) > 1})
        if repeated:
            raise ConfigError(field, f"{repeated[0]} is listed twice; give each once", shown)

    if config.intervention not in INTERVENTIONS:
        raise ConfigError("intervention", f"accepted: {', '.join(INTERVENTIONS)}", repr(config.intervention))
    listed("strategies", config.strategies, STRATEGIES)
    listed("kinds", config.kinds, KINDS)
    n_layers = model.cfg.n_layers
    layers = config.layers if config.layers is not None else tuple(range(n_layers))
    listed("layers", layers, range(n_layers))
    accepted_hooks = f"a family ({'|'.join(HOOK_FAMILIES)}) or a template with {{L}} like 'blocks.{{L}}.attn.hook_z'"
    for layer in layers:  # every layer's hook: a template may name a hook some layers lack
        try:
            name = config.hook_name(layer)
        except (KeyError, IndexError, ValueError):
            raise ConfigError("hook", f"a template may hold only {{L}} (the layer) in braces; accepted: {accepted_hooks}", repr(config.hook)) from None
        try:
            check_hook(model, name)
        except ValueError as exc:
            raise ConfigError("hook", f"{exc}; accepted: {accepted_hooks}", repr(config.hook)) from None
        if layer_of(name) is None:
            raise ConfigError("hook", f"{name!r} is not inside a block; accepted: {accepted_hooks}", repr(config.hook))
    if model.num_latents < 1:
        raise ConfigError("num_latents", "accepted: 1 or more", str(model.num_latents))
    check_pairs(model, pairs)


def check_pairs(model: LatentModel, pairs: Sequence[Pair]) -> None:
    """The pairs part of `check_sweep`: UsageError naming the first bad pair and how many are bad."""
    from interp.data.align import align_to_model

    if not pairs:
        raise ConfigError("pairs", "no pairs; accepted: a pairs file with at least one pair (interp pairs writes one)")
    ids = [p.id for p in pairs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ConfigError("pairs", f"pair id {repeated[0]!r} occurs {ids.count(repeated[0])} times; accepted: unique pair ids")
    problems = []
    for pair in pairs:
        problem = None
        if not all(isinstance(a, str) or math.isfinite(a) for a in (pair.clean_answer, pair.corrupted_answer)):
            problem = f"non-finite answer ({pair.clean_answer}, {pair.corrupted_answer}); accepted: finite numbers or answer texts"
        elif not align_to_model([pair], model, counts=(counts := Counter())):
            reason = next(k for k, v in counts.items() if k.startswith("drop.") and v)
            problem = f"its prompts do not align under the model's tokenizer ({reason.removeprefix('drop.')}); accepted: prompts of equal token length differing only in the changed number"
        else:
            try:
                common = first_difference(model.answer_token_ids(pair.clean_answer).tolist(), model.answer_token_ids(pair.corrupted_answer).tolist())
            except ValueError as exc:
                problem = str(exc)
            else:
                try:  # the trace's teacher-forced sequence, and the decode after it
                    model.check_question(pair.clean_question, n_answer=common, max_new_tokens=MAX_NEW_TOKENS)
                except ValueError as exc:
                    problem = f"{exc}; accepted: shorter questions"
        if problem:
            problems.append(f"pair {pair.id!r}: {problem}")
    if problems:
        raise ConfigError("pairs", f"{len(problems)} of {len(pairs)} pairs cannot be patched on this model; first: {problems[0]}")


def run_fingerprint(model: LatentModel, pairs: Sequence[Pair], config: SweepConfig) -> dict[str, Any]:
    """What a run's rows depend on (compared field by field on resume): model, pairs, config, versions."""
    return {
        "model": model_fingerprint(model),
        "pairs": {"n": len(pairs), "sha256": pairs_sha256(pairs)},
        "config": finite(asdict(config)),
        "versions": versions(),
    }


def run_sweep(
    model: LatentModel,
    pairs: Sequence[Pair],
    out_dir: str | Path,
    config: SweepConfig | None = None,
    *,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    logger: Any = None,
    force_new: bool = False,
    pairs_meta: dict[str, Any] | None = None,
    metrics: Sequence[Metric] | None = None,
    batch_size: int | None = None,
    executor: Any = None,
    model_spec: Any = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep into `out_dir`; returns the summary.

    `metrics`: callables `(PairTraces, PatchResult) -> dict` whose fields make the rows (default
    `interp.score.default_metrics(config.family)`); `batch_size`: rows per forward pass (default:
    what fits in memory; results do not depend on it). `executor`: where the units run
    (`interp.executor.LocalExecutor`, the default, on `model`; `RayExecutor` on actors that load
    `model_spec`, an `interp.executor.ModelSpec`); this process stays the only writer.

    Everything is checked (`check_sweep`, `check_output_dir`) and the fingerprint computed before
    the first file is written; then the directory is locked (interp.runio.open_run) and each unit's
    rows are appended whole, each test id once. `force_new` wipes a previous run in `out_dir`;
    `pairs_meta`, if given, saves the pairs to `out_dir/pairs.json` with it, under the lock.
    `logger`, if given, is called as logger(dict) after each unit (e.g. `wandb.log`).
    """
    config = config or SweepConfig()
    check_sweep(model, pairs, config)
    check_output_dir(out_dir)
    provenance = provenance or {}
    fingerprint = run_fingerprint(model, pairs, config)
    torch.manual_seed(config.seed)
    info = {
        "config": asdict(config),
        "pairs": len(pairs),
        "pair_ids": [p.id for p in pairs],
        "model": {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "num_latents": model.num_latents, "dtype": str(model.cfg.dtype), "device": str(model.device)},
        "provenance": provenance,
        "versions": fingerprint["versions"],
    }
    with open_run(out_dir, fingerprint, info, force_new=force_new) as run:
        if pairs_meta is not None:
            save_pairs(run.path / "pairs.json", pairs, pairs_meta)
        metrics = list(metrics) if metrics is not None else default_metrics(config.family)
        summary = _sweep(model, pairs, config, run, progress, logger, metrics, batch_size, executor, model_spec)
        run.finish(summary)
    return summary


@dataclass(frozen=True)
class PairWork:
    """A sweep's work on one pair: its units not yet on disk, and whether its validity checks are."""

    pair_index: int
    units: tuple[Unit, ...]
    check_validity: bool


class SweepWork:
    """The work function executors run: `(model, [PairWork]) -> [(validity report or None, [rows per unit])]`.

    Picklable (Ray sends it to every worker once); the intervention is built on each worker's model
    the first time it is needed. The pairs of one call are traced (lean: the swept family and what the
    validity checks patch), checked, and their units run through one engine, in batches that start late first.
    """

    def __init__(self, pairs: Sequence[Pair], config: SweepConfig, metrics: Sequence[Metric], batch_size: int | None):
        self.pairs, self.config, self.metrics, self.batch_size = list(pairs), config, list(metrics), batch_size
        self._intervention: Intervention | None = None

    def __call__(self, model: LatentModel, items: Sequence[PairWork]) -> list[tuple[dict[str, Any] | None, list[list[dict[str, Any]]]]]:
        config = self.config
        if self._intervention is None:
            self._intervention = sweep_intervention(model, self.pairs, config, progress=False)
        keep = lambda name: name.endswith("." + config.family) or name == "blocks.0.hook_resid_pre"  # noqa: E731
        group = [trace_pair(model, self.pairs[item.pair_index], names_filter=keep) for item in items]
        reports = [validity_checks(model, pt, config.strategies) if item.check_validity else None for pt, item in zip(group, items)]
        todo = sorted(((g, u) for g, item in enumerate(items) for u in item.units), key=lambda gu: batch_order(gu[1]))
        rows: dict[tuple[int, Unit], list[dict[str, Any]]] = {}
        if todo:
            patcher = sweep_patcher(model, group, config, self.batch_size)
            for i in range(0, len(todo), patcher.batch_size):
                chunk = todo[i : i + patcher.batch_size]
                rows.update(zip(chunk, run_units(patcher, group, chunk, config, self._intervention, self.metrics)))
        return [(report, [rows[(g, u)] for u in item.units]) for g, (item, report) in enumerate(zip(items, reports))]


def pairs_per_call(model: LatentModel, units_per_pair: int) -> int:
    """Pairs traced and run together: about one full batch of rows, at most MAX_GROUP_PAIRS (their traces are held meanwhile)."""
    rows = MAX_ROWS["cuda" if model.device.type == "cuda" else "cpu"]
    return max(1, min(MAX_GROUP_PAIRS, -(-rows // max(1, units_per_pair))))


def sweep(
    model: LatentModel,
    pairs: Sequence[Pair],
    config: SweepConfig | None = None,
    *,
    metrics: Sequence[Metric] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    executor: Any = None,
    model_spec: Any = None,
) -> pd.DataFrame:
    """Run a sweep in memory: its rows (the schema of `interp.score.ResultRow`, one per patch test)
    as a pandas DataFrame; `df.attrs["validity"]` holds one validity report per pair.

    The same checks, work and rows as `run_sweep`, without a run directory (nothing is written).
    """
    config = config or SweepConfig()
    check_sweep(model, pairs, config)
    torch.manual_seed(config.seed)
    metrics = list(metrics) if metrics is not None else default_metrics(config.family)
    rows: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    for report, unit_rows_list in _work(model, pairs, config, set(), set(), progress, metrics, batch_size, executor, model_spec):
        reports += [report] if report is not None else []
        rows += [r for unit in unit_rows_list for r in unit]
    df = pd.DataFrame(rows)
    df.attrs["validity"] = reports
    return df


def _work(
    model: LatentModel,
    pairs: Sequence[Pair],
    config: SweepConfig,
    done: Any,
    checked: Any,
    progress: bool,
    metrics: Sequence[Metric],
    batch_size: int | None,
    executor: Any,
    model_spec: Any,
):
    """Yield (validity report or None, [rows per unit]) for every unit whose tests are not in `done`
    (test ids), pair by pair as `executor` finishes them; validity is checked for pairs not in `checked`."""
    todo = units(config, len(pairs), model.cfg.n_layers, model.num_latents)

    def finished(u: Unit) -> bool:
        pair_id, hook = pairs[u.pair_index].id, config.hook_name(u.layer)
        return all(u.test_id(pair_id, hook, s) in done for s in config.strategies)

    remaining = [u for u in todo if not finished(u)]
    by_pair: dict[int, list[Unit]] = {}
    for unit in remaining:
        by_pair.setdefault(unit.pair_index, []).append(unit)
    work = [PairWork(i, tuple(us), pairs[i].id not in checked) for i, us in by_pair.items()]
    bar = tqdm(total=len(todo) * len(config.strategies), initial=(len(todo) - len(remaining)) * len(config.strategies), desc="patch tests", disable=not progress)
    executor = executor if executor is not None else LocalExecutor(model)
    per_call = pairs_per_call(model, len(todo) // max(1, len(pairs)))
    work_fn = SweepWork(pairs, config, metrics, batch_size)
    for _item, (report, unit_rows_list) in executor.map_units(model_spec, work, work_fn, batch_size=per_call, fingerprint=model_fingerprint(model)):
        if report is not None and not report["passed"]:
            failed = [k for k, c in report["checks"].items() if not c["passed"]]
            tqdm.write(f"VALIDITY CHECK FAILED for pair {report['pair_id']}: {', '.join(failed)}")
        yield report, unit_rows_list
        bar.update(sum(len(rows) for rows in unit_rows_list))
    bar.close()


def _sweep(
    model: LatentModel,
    pairs: Sequence[Pair],
    config: SweepConfig,
    run: Run,
    progress: bool,
    logger: Any,
    metrics: Sequence[Metric],
    batch_size: int | None,
    executor: Any,
    model_spec: Any,
) -> dict[str, Any]:
    """The units not yet on disk, appended to `run` pair by pair by this process alone; then the summary."""
    for report, unit_rows_list in _work(model, pairs, config, run.results.keys, run.validity.keys, progress, metrics, batch_size, executor, model_spec):
        if report is not None:
            run.validity.append([report])
        for rows in unit_rows_list:  # each unit lands whole (the rows not yet on disk) or not at all
            run.results.append(rows)
            if logger is not None:
                logger({f"{r['strategy']}/{r['kind']}/normalized_effect": r["normalized_effect"] for r in rows})
    return summarize(read_jsonl(run.path / RESULTS), read_jsonl(run.path / VALIDITY), config)
