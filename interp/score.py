"""Scoring patched runs: metric callables, the typed result row, and the validity checks.

A metric is a callable `metric(pt: PairTraces, result: PatchResult) -> dict[str, value]` (as
TransformerLens's `generic_activation_patch` takes a `patching_metric`); a sweep's rows hold the
union of its metrics' fields. The defaults are `answer_metrics`, `latent_similarity` and
`activation_similarity(family)`. Every field is documented in results/README.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import torch

from interp.engine import BatchPatcher, Job, PatchResult, Site
from interp.interventions import Intervention
from interp.metrics import answer_flip, cache_similarity, kl_divergence, logit_diff, normalized_effect
from interp.model import LatentModel
from interp.plan import Unit
from interp.trace import PairTraces, similarity_positions

Metric = Callable[[PairTraces, PatchResult], dict[str, Any]]
VALIDITY_TOL = 1e-3


class ResultRow(TypedDict, total=False):
    """One line of results.jsonl: the test's identity, then its metrics (results/README.md)."""

    test_id: str
    pair_id: str
    hook: str
    layer: int
    kind: str
    latents: list[int]
    k: int
    position: str | None
    strategy: str
    intervention: str
    changed_slot: int | None
    clean_intermediates: list[float]
    corrupted_intermediates: list[float]
    sim_positions: list[str]
    logit_diff: float
    clean_logit_diff: float
    corrupted_logit_diff: float
    normalized_effect: float
    kl: float
    flip: bool
    patched_answer: float | None
    clean_answer: float | None
    corrupted_answer: float | None
    latent_cos: list[float]
    sim_cos: list[list[float]]
    sim_rel_l2: list[list[float]]
    par_cos: list[list[float]]
    par_rel_l2: list[list[float]]


def answer_metrics(pt: PairTraces, result: PatchResult) -> dict[str, Any]:
    """Logit difference at the answers' first differing token, normalized effect, KL, answer flip."""
    ld = logit_diff(result.next_logits, pt.clean_token, pt.corrupted_token)
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
    }


def latent_similarity(pt: PairTraces, result: PatchResult) -> dict[str, Any]:
    """Cosine of each fed latent of the patched run with the clean run's."""
    cos = torch.nn.functional.cosine_similarity(result.latents.cpu().double(), pt.clean.latents.cpu().double(), dim=-1)
    return {"latent_cos": cos.tolist()}


def activation_similarity(family: str) -> Metric:
    """Patched vs clean activations of a hook family at every layer, at the similarity positions."""

    def metric(pt: PairTraces, result: PatchResult) -> dict[str, Any]:
        positions, names = similarity_positions(pt.corrupted)
        sim = cache_similarity(result.cache, pt.clean.cache, family, positions)
        return {"sim_positions": names, "sim_cos": sim["cos"].tolist(), "sim_rel_l2": sim["rel_l2"].tolist()}

    metric.__name__ = f"activation_similarity({family})"
    return metric


def default_metrics(family: str) -> list[Metric]:
    return [answer_metrics, latent_similarity, activation_similarity(family)]


def unit_rows(
    pt: PairTraces, unit: Unit, hook: str, results: dict[str, PatchResult], metrics: Sequence[Metric], *, family: str | None = None, intervention: Intervention | None = None
) -> list[ResultRow]:
    """The rows of one unit from its patched results, one per strategy.

    With `family` given, iterative rows also compare their activations with the parallel run's
    (`par_cos`, `par_rel_l2`).
    """
    rows = []
    for strategy, result in results.items():
        row: ResultRow = {
            "test_id": unit.test_id(pt.pair.id, hook, strategy),
            "pair_id": pt.pair.id,
            "hook": hook,
            "layer": unit.layer,
            "kind": unit.kind,
            "latents": list(unit.latents),
            "k": len(unit.latents),
            "position": f"latent[{unit.latents[0]}]" if unit.kind == "single" else None,
            "strategy": strategy,
            "intervention": (intervention.describe() if intervention is not None else "clean"),
            "changed_slot": pt.pair.changed_slot,
            "clean_intermediates": list(pt.pair.clean_intermediates),
            "corrupted_intermediates": list(pt.pair.corrupted_intermediates),
        }
        for metric in metrics:
            row.update(metric(pt, result))
        if family is not None and strategy == "iterative" and "parallel" in results:
            positions, _ = similarity_positions(pt.corrupted)
            sim = cache_similarity(result.cache, results["parallel"].cache, family, positions)
            row["par_cos"], row["par_rel_l2"] = sim["cos"].tolist(), sim["rel_l2"].tolist()
        rows.append(row)
    return rows


def validity_checks(model: LatentModel, pt: PairTraces, strategies: Sequence[str] = ("parallel", "iterative")) -> dict[str, Any]:
    """Patching nothing reproduces corrupted; clean resid_pre everywhere reproduces clean; clean into clean is identity.

    Each check compares next_logits (max abs difference) under each strategy; feedback, which
    patches latent positions only, is checked with nothing patched.
    """
    every = (Site("blocks.0.hook_resid_pre", tuple(range(pt.corrupted.seq_len))),)
    # (sites, pair: 0 = corrupted <- clean, 1 = clean <- clean, the run expected)
    cases = {"nothing_is_corrupted": ((), 0, pt.corrupted), "all_inputs_is_clean": (every, 0, pt.clean), "clean_into_clean_is_clean": (every, 1, pt.clean)}
    planned = [(name, s, Job(sites, s, pair=pair)) for name, (sites, pair, _) in cases.items() for s in strategies if s != "feedback" or not sites]
    results = BatchPatcher(model, [(pt.corrupted, pt.clean), (pt.clean, pt.clean)], decode=False).run([job for _, _, job in planned])
    checks = {}
    for (name, strategy, _), result in zip(planned, results):
        diff = float((result.next_logits - cases[name][2].next_logits).abs().max())
        checks[f"{name}/{strategy}"] = {"max_abs_diff": diff, "passed": diff < VALIDITY_TOL}
    return {"pair_id": pt.pair.id, "checks": checks, "passed": all(c["passed"] for c in checks.values())}
