"""Patching sweeps over pairs x layers x latent sets x strategies: resumable, with validity checks.

A run directory holds:
- `results.jsonl`: one row per patch test (schema below), appended atomically per unit of work
  (one pair, one hook, one latent set, both strategies), so an interrupted run resumes with no
  finished test lost or repeated.
- `validity.jsonl`: one row per pair with the three validity checks.
- `summary.json`: means with bootstrap 95% CIs across pairs per (strategy, kind, layer, latents),
  iterative-minus-parallel paired differences, the failed validity checks, and a verdict.
- `run.json`: config, versions, seed, model and pairs provenance.

Row schema (results.jsonl):
    test_id, pair_id, hook, layer, kind ("single" | "all" | "cumulative"), latents (list of 0-based
    latent indices), k (len(latents)), position ("latent[t]" for single, else null), strategy,
    logit_diff, clean_logit_diff, corrupted_logit_diff, normalized_effect, kl, flip,
    patched_answer, clean_answer, corrupted_answer,
    changed_slot, clean_intermediates, corrupted_intermediates (the pair's, see `interp.data.Pair`),
    latent_cos (K floats: cosine of each fed latent with the clean run's latent),
    sim_positions (names), sim_cos / sim_rel_l2 ([n_layers][len(sim_positions)], patched vs clean
    for the hook family), and on iterative rows par_cos / par_rel_l2 (iterative vs parallel).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.data.pairs import Pair
from interp.metrics import answer_flip, cache_similarity, first_difference, kl_divergence, logit_diff, normalized_effect
from interp.model import CodiModel, Trace
from interp.patching import STRATEGIES, PatchResult, Site, check_aligned, latent_sites, run_patched

HOOK_FAMILIES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
KINDS = ("single", "all", "cumulative")
ENGINES = ("fast", "naive")
#: the fast engine batches the units of up to this many pairs together (their traces are held meanwhile)
MAX_GROUP_PAIRS = 16
VALIDITY_TOL = 1e-3


@dataclass
class SweepConfig:
    """What a sweep runs. `hook` is a family (`resid_post`) or a template (`blocks.{L}.attn.hook_z`)."""

    hook: str = "resid_post"
    strategies: tuple[str, ...] = STRATEGIES
    kinds: tuple[str, ...] = KINDS
    layers: tuple[int, ...] | None = None
    seed: int = 0
    bootstrap: int = 2000
    #: "fast" (interp.fast: prefix reuse, batched units; same results) or "naive" (run_unit per unit)
    engine: str = "fast"

    def hook_name(self, layer: int) -> str:
        template = self.hook if "{L}" in self.hook else f"blocks.{{L}}.hook_{self.hook}"
        return template.format(L=layer)

    @property
    def family(self) -> str:
        """The hook suffix compared by the similarity metrics (`hook_resid_post`, `attn.hook_z`)."""
        return self.hook_name(0).split(".", 2)[2]


@dataclass
class PairTraces:
    """A pair's clean and corrupted traces, aligned, scored at the answers' first differing token."""

    pair: Pair
    clean: Trace
    corrupted: Trace
    clean_token: int
    corrupted_token: int

    @property
    def clean_logit_diff(self) -> float:
        return logit_diff(self.clean.next_logits, self.clean_token, self.corrupted_token)

    @property
    def corrupted_logit_diff(self) -> float:
        return logit_diff(self.corrupted.next_logits, self.clean_token, self.corrupted_token)


def trace_pair(model: CodiModel, pair: Pair) -> PairTraces:
    """Trace both sides with the answers' common prefix teacher-forced after `The answer is:`."""
    clean_ids = model.answer_token_ids(pair.clean_answer)
    corrupted_ids = model.answer_token_ids(pair.corrupted_answer)
    i = first_difference(clean_ids.tolist(), corrupted_ids.tolist())
    common = clean_ids[:i]
    clean = model.trace(pair.clean_question, answer=common)
    corrupted = model.trace(pair.corrupted_question, answer=common)
    check_aligned(corrupted, clean)
    return PairTraces(pair, clean, corrupted, int(clean_ids[i]), int(corrupted_ids[i]))


def latent_sets(kind: str, k: int) -> list[tuple[int, ...]]:
    """The latent index sets a kind of test patches: each alone, all at once, or the first j."""
    if kind == "single":
        return [(t,) for t in range(k)]
    if kind == "all":
        return [tuple(range(k))]
    if kind == "cumulative":
        return [tuple(range(j)) for j in range(1, k + 1)]
    raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")


@dataclass(frozen=True)
class Unit:
    """One unit of work: a pair, a layer, a latent set, every strategy."""

    pair_index: int
    layer: int
    kind: str
    latents: tuple[int, ...]

    def test_id(self, pair_id: str, hook: str, strategy: str) -> str:
        return f"{pair_id}|{hook}|{self.kind}|{','.join(map(str, self.latents))}|{strategy}"


def units(config: SweepConfig, n_pairs: int, n_layers: int, n_latents: int) -> list[Unit]:
    layers = config.layers if config.layers is not None else tuple(range(n_layers))
    return [
        Unit(p, layer, kind, latents)
        for p in range(n_pairs)
        for layer in layers
        for kind in config.kinds
        for latents in latent_sets(kind, n_latents)
    ]


def similarity_positions(trace: Trace) -> tuple[list[int], list[str]]:
    """Positions whose activations the similarity metrics compare: the latents, eot, the answer."""
    positions = trace.latent_positions + [trace.position("eot"), trace.answer_position]
    return positions, [trace.position_names[p] if p != trace.answer_position else "answer" for p in positions]


def score(pt: PairTraces, result: PatchResult, family: str, sim_pos: list[int]) -> dict[str, Any]:
    """The metrics of one patched run against its pair's clean and corrupted traces."""
    ld = logit_diff(result.next_logits, pt.clean_token, pt.corrupted_token)
    sim = cache_similarity(result.cache, pt.clean.cache, family, sim_pos)
    latent_cos = torch.nn.functional.cosine_similarity(result.latents.cpu().double(), pt.clean.latents.cpu().double(), dim=-1)
    return {
        "logit_diff": ld,
        "clean_logit_diff": pt.clean_logit_diff,
        "corrupted_logit_diff": pt.corrupted_logit_diff,
        "normalized_effect": normalized_effect(ld, pt.clean_logit_diff, pt.corrupted_logit_diff),
        "kl": kl_divergence(pt.clean.next_logits, result.next_logits),
        "flip": answer_flip(result.answer, pt.pair.clean_answer),
        "patched_answer": result.answer,
        "clean_answer": pt.pair.clean_answer,
        "corrupted_answer": pt.pair.corrupted_answer,
        "latent_cos": latent_cos.tolist(),
        "sim_cos": sim["cos"].tolist(),
        "sim_rel_l2": sim["rel_l2"].tolist(),
    }


def run_unit(model: CodiModel, pt: PairTraces, unit: Unit, config: SweepConfig) -> list[dict[str, Any]]:
    """All strategies of one unit; the iterative row also compares its cache with the parallel one."""
    site = latent_sites(pt.corrupted, config.hook_name(unit.layer), unit.latents)
    results = {s: run_patched(model, pt.corrupted, pt.clean, [site], s) for s in config.strategies}
    return unit_rows(pt, unit, config, results)


def batch_order(unit: Unit) -> tuple:
    """Sort key for the fast engine: units that patch only late latents share batches that start
    late (less to recompute); ties by layer, latent set and pair."""
    return (min(unit.latents), unit.layer, unit.kind, unit.latents, unit.pair_index)


def fast_patcher(model: CodiModel, group: Sequence[PairTraces], config: SweepConfig, batch_size: int | None = None):
    """The batched engine over a group of pairs, recording what `score` reads (the family at the similarity positions)."""
    from interp.fast import BatchPatcher

    positions = [similarity_positions(pt.corrupted)[0] for pt in group]
    return BatchPatcher(model, [(pt.corrupted, pt.clean) for pt in group], capture=config.family, capture_positions=positions, batch_size=batch_size)


def run_units_fast(patcher, group: Sequence[PairTraces], batch: Sequence[tuple[int, Unit]], config: SweepConfig) -> list[list[dict[str, Any]]]:
    """`run_unit` for (index in group, unit) items through the batched engine: the rows of each unit."""
    from interp.fast import Job

    jobs = [Job((latent_sites(group[g].corrupted, config.hook_name(u.layer), u.latents),), s, pair=g) for g, u in batch for s in config.strategies]
    results = iter(patcher.run(jobs))
    return [unit_rows(group[g], u, config, {s: next(results) for s in config.strategies}) for g, u in batch]


def unit_rows(pt: PairTraces, unit: Unit, config: SweepConfig, results: dict[str, PatchResult]) -> list[dict[str, Any]]:
    """The rows of one unit from its patched results, one per strategy."""
    hook = config.hook_name(unit.layer)
    sim_pos, sim_names = similarity_positions(pt.corrupted)
    rows = []
    for strategy, result in results.items():
        row = {
            "test_id": unit.test_id(pt.pair.id, hook, strategy),
            "pair_id": pt.pair.id,
            "hook": hook,
            "layer": unit.layer,
            "kind": unit.kind,
            "latents": list(unit.latents),
            "k": len(unit.latents),
            "position": f"latent[{unit.latents[0]}]" if unit.kind == "single" else None,
            "strategy": strategy,
            "sim_positions": sim_names,
            "changed_slot": pt.pair.changed_slot,
            "clean_intermediates": list(pt.pair.clean_intermediates),
            "corrupted_intermediates": list(pt.pair.corrupted_intermediates),
            **score(pt, result, config.family, sim_pos),
        }
        if strategy == "iterative" and "parallel" in results:
            sim = cache_similarity(result.cache, results["parallel"].cache, config.family, sim_pos)
            row["par_cos"], row["par_rel_l2"] = sim["cos"].tolist(), sim["rel_l2"].tolist()
        rows.append(row)
    return rows


def validity_checks(model: CodiModel, pt: PairTraces) -> dict[str, Any]:
    """Patching nothing reproduces corrupted; clean resid_pre everywhere reproduces clean; clean into clean is identity.

    Each check compares next_logits (max abs difference) under both strategies.
    """
    every = tuple(range(pt.corrupted.seq_len))
    all_inputs = [Site("blocks.0.hook_resid_pre", every)]
    checks = {}
    for strategy in STRATEGIES:
        cases = {
            "nothing_is_corrupted": (run_patched(model, pt.corrupted, pt.clean, [], strategy, with_cache=False, decode=False), pt.corrupted),
            "all_inputs_is_clean": (run_patched(model, pt.corrupted, pt.clean, all_inputs, strategy, with_cache=False, decode=False), pt.clean),
            "clean_into_clean_is_clean": (run_patched(model, pt.clean, pt.clean, all_inputs, strategy, with_cache=False, decode=False), pt.clean),
        }
        for name, (result, expected) in cases.items():
            diff = float((result.next_logits - expected.next_logits).abs().max())
            checks[f"{name}/{strategy}"] = {"max_abs_diff": diff, "passed": diff < VALIDITY_TOL}
    return {"pair_id": pt.pair.id, "checks": checks, "passed": all(c["passed"] for c in checks.values())}


# ----------------------------------------------------------------------------- files


def atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot serialise {type(x).__name__}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a run killed mid-write) is dropped and the file repaired."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path} line {i + 1} is not JSON; the file is corrupt, delete the run directory") from None
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # drop the torn tail
    return rows


def append_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows in one write and fsync, so a unit of work lands whole or not at all."""
    with path.open("a") as f:
        f.write("".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def versions() -> dict[str, str]:
    """Installed versions of what a result depends on (package metadata: transformer-lens has no __version__)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("interp", "torch", "transformer-lens", "transformers", "numpy"):
        try:
            out[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            out[dist.replace("-", "_")] = "not installed"
    return out


# ----------------------------------------------------------------------------- the sweep


def _without_engine(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A config without its engine: both engines give the same results, so a run may switch."""
    return None if config is None else {k: v for k, v in config.items() if k != "engine"}


def run_sweep(
    model: CodiModel,
    pairs: Sequence[Pair],
    out_dir: str | Path,
    config: SweepConfig = SweepConfig(),
    *,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    logger: Any = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep into `out_dir`; returns the summary.

    `logger`, if given, is called as logger(dict) after each unit (e.g. `wandb.log`).
    """
    if config.engine not in ENGINES:
        raise ValueError(f"unknown engine {config.engine!r}; use one of {ENGINES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    run_info = {
        "config": asdict(config),
        "pairs": len(pairs),
        "pair_ids": [p.id for p in pairs],
        "model": {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "num_latents": model.num_latents, "dtype": str(model.cfg.dtype), "device": str(model.device)},
        "provenance": provenance or {},
        "versions": versions(),
    }
    run_path = out / "run.json"
    if run_path.exists():
        previous = json.loads(run_path.read_text())
        same_config = _without_engine(previous.get("config")) == _without_engine(json.loads(json.dumps(run_info["config"])))
        if not same_config or previous.get("pair_ids") != run_info["pair_ids"]:
            raise ValueError(f"{out} holds a run with another config or other pairs; choose another --out or delete it")
        run_info["started"] = previous.get("started")
    else:
        run_info["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(run_path, run_info)

    results_path, validity_path = out / "results.jsonl", out / "validity.jsonl"
    done = {r["test_id"] for r in read_jsonl(results_path)}
    checked = {r["pair_id"] for r in read_jsonl(validity_path)}
    todo = units(config, len(pairs), model.cfg.n_layers, model.num_latents)
    for layer in config.layers or ():
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has layers 0..{model.cfg.n_layers - 1}")

    def finished(u: Unit) -> bool:
        pair_id, hook = pairs[u.pair_index].id, config.hook_name(u.layer)
        return all(u.test_id(pair_id, hook, s) in done for s in config.strategies)

    remaining = [u for u in todo if not finished(u)]
    bar = tqdm(total=len(todo) * len(config.strategies), initial=(len(todo) - len(remaining)) * len(config.strategies), desc="patch tests", disable=not progress)
    by_pair: dict[int, list[Unit]] = {}
    for unit in remaining:
        by_pair.setdefault(unit.pair_index, []).append(unit)

    def land(unit_rows_list: list[list[dict[str, Any]]]) -> None:
        for rows in unit_rows_list:  # each unit lands whole or not at all
            append_jsonl(results_path, rows)
            if logger is not None:
                logger({f"{r['strategy']}/{r['kind']}/normalized_effect": r["normalized_effect"] for r in rows})
            bar.update(len(rows))

    group: list[PairTraces] = []  # fast engine: pairs traced so far and not yet run, batched together
    group_units: list[tuple[int, Unit]] = []
    for n, (pair_index, pair_units) in enumerate(by_pair.items()):
        pt = trace_pair(model, pairs[pair_index])
        if pt.pair.id not in checked:
            report = validity_checks(model, pt)
            append_jsonl(validity_path, [report])
            checked.add(pt.pair.id)
            if not report["passed"]:
                failed = [k for k, c in report["checks"].items() if not c["passed"]]
                tqdm.write(f"VALIDITY CHECK FAILED for pair {pt.pair.id}: {', '.join(failed)}")
        if config.engine == "naive":
            for unit in pair_units:
                land([run_unit(model, pt, unit, config)])
            continue
        group_units += [(len(group), u) for u in pair_units]
        group.append(pt)
        patcher = fast_patcher(model, group, config)
        full = len(group_units) >= patcher.batch_size or len(group) == MAX_GROUP_PAIRS  # a batch's worth of rows per strategy
        if full or n == len(by_pair) - 1:
            group_units.sort(key=lambda gu: batch_order(gu[1]))
            for i in range(0, len(group_units), patcher.batch_size):
                land(run_units_fast(patcher, group, group_units[i : i + patcher.batch_size], config))
            group, group_units = [], []  # memory stays flat: at most MAX_GROUP_PAIRS pairs' traces at a time
    bar.close()
    summary = summarize(read_jsonl(results_path), read_jsonl(validity_path), config)
    atomic_write_json(out / "summary.json", summary)
    run_info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(run_path, run_info)
    return summary


# ----------------------------------------------------------------------------- summary

METRICS = ("normalized_effect", "logit_diff", "kl", "flip")


def bootstrap_ci(values: Sequence[float], n_resamples: int, seed: int) -> tuple[float, float, float, int]:
    """Mean and percentile-bootstrap 95% CI over pairs (NaNs dropped). CI is NaN when n < 2."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan, 0
    if len(x) < 2 or np.all(x == x[0]):
        return float(x.mean()), (math.nan if len(x) < 2 else float(x[0])), (math.nan if len(x) < 2 else float(x[0])), len(x)
    from scipy.stats import bootstrap

    res = bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=0.95, method="percentile", random_state=np.random.default_rng(seed))
    return float(x.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high), len(x)


def _cells(rows: list[dict[str, Any]]) -> Iterator[tuple[tuple, list[dict[str, Any]]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["kind"], r["layer"], tuple(r["latents"])), []).append(r)
    return iter(sorted(groups.items()))


def summarize(rows: list[dict[str, Any]], validity: list[dict[str, Any]], config: SweepConfig) -> dict[str, Any]:
    """Per-cell means with bootstrap CIs, paired iterative-minus-parallel differences, a verdict."""
    cells = []
    for (strategy, kind, layer, latents), group in _cells(rows):
        cell = {"strategy": strategy, "kind": kind, "layer": layer, "latents": list(latents), "hook": group[0]["hook"]}
        for metric in METRICS:
            mean, lo, hi, n = bootstrap_ci([float(r[metric]) for r in group], config.bootstrap, config.seed)
            cell[metric] = {"mean": mean, "ci_low": lo, "ci_high": hi, "n": n}
        cells.append(cell)

    by_key = {(r["pair_id"], r["kind"], r["layer"], tuple(r["latents"]), r["strategy"]): r for r in rows}
    differences = []
    for (strategy, kind, layer, latents), group in _cells(rows):
        if strategy != "iterative":
            continue
        diffs = [
            r["normalized_effect"] - by_key[(r["pair_id"], kind, layer, latents, "parallel")]["normalized_effect"]
            for r in group
            if (r["pair_id"], kind, layer, latents, "parallel") in by_key
        ]
        mean, lo, hi, n = bootstrap_ci(diffs, config.bootstrap, config.seed)
        differences.append({"kind": kind, "layer": layer, "latents": list(latents), "mean": mean, "ci_low": lo, "ci_high": hi, "n": n, "ci_excludes_zero": bool(n >= 2 and (lo > 0 or hi < 0))})

    failed = [{"pair_id": v["pair_id"], "failed": [k for k, c in v["checks"].items() if not c["passed"]]} for v in validity if not v["passed"]]
    return {
        "hook": config.hook,
        "n_pairs": len({r["pair_id"] for r in rows}),
        "n_tests": len(rows),
        "cells": cells,
        "iterative_minus_parallel": differences,
        "validity": {"n_pairs": len(validity), "n_failed": len(failed), "failed": failed, "tolerance": VALIDITY_TOL},
        "verdict": verdict(differences, failed),
    }


def verdict(differences: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    """A plain-language answer to: do iterative and parallel patching differ on this model?"""
    lines = []
    if failed:
        lines.append(f"WARNING: {len(failed)} pair(s) failed a validity check; their results are suspect.")
    tested = [d for d in differences if d["n"] >= 2]
    if not tested:
        return " ".join(lines + ["Too few pairs (fewer than 2) to tell whether iterative and parallel patching differ."])
    sig = [d for d in tested if d["ci_excludes_zero"]]
    all_cells = [d for d in tested if d["kind"] == "all"]
    all_sig = [d for d in all_cells if d["ci_excludes_zero"]]
    if sig:
        biggest = max(sig, key=lambda d: abs(d["mean"]))
        lines.append(
            f"Iterative and parallel patching differ: in {len(sig)} of {len(tested)} (layer, latent set) cells the "
            f"95% CI of the paired difference in normalized effect excludes zero "
            f"(all-latents patch: {len(all_sig)} of {len(all_cells)} layers). Largest: {biggest['kind']} latents "
            f"{biggest['latents']} at layer {biggest['layer']}, iterative - parallel = {biggest['mean']:+.3f} "
            f"[{biggest['ci_low']:+.3f}, {biggest['ci_high']:+.3f}], n = {biggest['n']} pairs."
        )
    else:
        lines.append(
            f"No detectable difference between iterative and parallel patching: in all {len(tested)} cells the 95% CI of "
            "the paired difference in normalized effect includes zero."
        )
    return " ".join(lines)
