"""Why an earlier study saw iterative and parallel patching agree to machine precision (issue 21).

A study of CODI-LLaMA-1B (57 GSM8K pairs x 16 layers) found both strategies identical (mean KL
0.000369, logit difference -0.0416 +- 1.429 for both) and concluded that latent positions compute
in parallel. This module re-implements its procedure on `LatentModel`s and takes it apart step by step.

The earlier procedure, per pair, layer L and latent index N (0-based):

1. inputs: `question ids + bot + K x pad + eot + answer-prefix ids` (`pad_sequence`), ONE ordinary
   forward pass: no latent loop, nothing fed back;
2. `parallel_patch`: the clean run's `blocks.L.hook_resid_post` written at latents 0..N in one pass;
   `iterative_patch`: passes j = 0..N, pass j re-writes the CLEAN activation at every latent <= j,
   reads the regenerated activation at the position after latent j, and the last pass gives the outputs;
3. `question_kl`: KL(clean || patched) of the next-token distributions averaged over the question positions;
4. `template_logit_diff`: logit(clean answer's first token) - logit(corrupted answer's first token) at
   the position whose next token is the first token of the answer prefix ("The": eot, or its suffix).

Why the equality holds by construction (each tested in tests/unit/test_earlier_study.py):

- (a) the iterative patcher's last pass performs exactly the parallel patcher's writes, and with pad
  inputs no position's input depends on an earlier position's output, so nothing carries from one pass
  to the next: the two results are the same computation. Its "regenerated" activation at layer L is
  the corrupted run's own, exactly: a write at `blocks.L.hook_resid_post` reaches later positions only
  from block L+1 on (through attention), never the same layer. The study's "> 99.84% similar to clean"
  is the cosine of the corrupted run with the clean one at pad positions, whatever is patched.
- (b) question positions precede every latent, so by causal attention the patch cannot reach them:
  KL(clean || patched) there equals KL(clean || unpatched corrupted) exactly, for every patch.
- (c) the "The" position predicts a fixed template token, not the answer.

`earlier_procedure(model, pairs, layers, variant=...)` runs the procedure (variant "earlier") or
swaps ONE running step: "regenerated" (the iterative patcher feeds the activations it regenerated
instead of re-writing the clean ones) or "loop" (the model's real latent loop instead of pads:
parallel holds the corrupted run's fed thoughts, iterative re-runs the loop with the patch at each
step, as `interp.patch` does). Each row also carries the metrics that replace steps 3 and 4
(`kl_after_latents`: KL averaged over eot and every later position; `answer_logit_diff`: at the
answer's first differing token), so `ablation_table` can ablate each step alone. Positions come from
`SequenceLayout`; every pass goes through `LatentModel.forward` with TransformerLens hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import Tensor

from interp.data.pairs import Pair
from interp.hooks import Hook, at_positions
from interp.layout import SequenceLayout
from interp.metrics import first_difference
from interp.model import LatentModel

Variant = Literal["earlier", "regenerated", "loop"]
VARIANTS: tuple[Variant, ...] = ("earlier", "regenerated", "loop")
PROCEDURES = ("parallel", "iterative")
#: the metric columns of `earlier_procedure`: the earlier study's (kl, logit_diff) and those that replace them
METRICS = ("kl", "logit_diff", "kl_after_latents", "answer_logit_diff")
#: pairs run together in one forward pass at most
MAX_BATCH = 64


def resid_hook(layer: int) -> str:
    """The hook the earlier study patched: `blocks.{layer}.hook_resid_post`."""
    return f"blocks.{layer}.hook_resid_post"


# ----------------------------------------------------------------------------- step 1: the inputs


def pad_sequence(model: LatentModel, question: str, answer_ids: Tensor | None = None) -> tuple[Tensor, SequenceLayout]:
    """The earlier study's input: tokens [seq] = question ids (BOS, question suffix) + bot + K x pad +
    eot (+ eot suffix) + answer-prefix ids (+ `answer_ids`, teacher-forced), and its layout.

    The latent positions hold the pad id (`model.pad_id`: CODI's pad row, Coconut's eos), so the
    sequence runs as one ordinary forward pass over token embeddings; nothing is fed back.
    """
    q = model.encode(question)
    pads = torch.full((model.num_latents,), model.pad_id, dtype=torch.long)
    tokens = torch.cat([model.prompt_ids(question), pads, model.tail_ids(answer_ids)])
    return tokens, model.layout(len(q), 0 if answer_ids is None else len(answer_ids))


@torch.no_grad()
def loop_embeds(model: LatentModel, questions: Sequence[str], answer_ids: Tensor | None = None, fwd_hooks: Sequence[Hook] = ()) -> Tensor:
    """Input embeddings [batch, seq, d_model] of the real latent loop's sequences (the fed thoughts at
    the latent positions), questions of one token length; `fwd_hooks` act in the loop."""
    latents, _, _ = model.run_latents(list(questions), fwd_hooks)
    return torch.stack([model.sequence(model.encode(q), latents[r], answer_ids)[1] for r, q in enumerate(questions)])


# ----------------------------------------------------------------------------- step 2: the patchers


def _writer(positions: Sequence[int], values: Tensor, read: int | None = None, store: list[Tensor] | None = None):
    """A TransformerLens hook function writing values [batch, len(positions), d] at `positions` and,
    with `read`, appending the activation at position `read` ([batch, d]) to `store`."""

    def hook(act: Tensor, hook) -> Tensor:
        act = act.clone()
        act[:, list(positions)] = values.to(act)
        if read is not None and read < act.shape[1]:
            store.append(act[:, read].clone())
        return act

    return hook


@torch.no_grad()
def parallel_patch(model: LatentModel, corrupted_embeds: Tensor, clean_resid: Tensor, layer: int, positions: Sequence[int]) -> Tensor:
    """One pass over the corrupted inputs [batch, seq, d_model] with the clean run's
    `blocks.{layer}.hook_resid_post` (clean_resid [batch, seq, d_model]) written at `positions`.
    Returns logits [batch, seq, d_vocab]."""
    positions = list(positions)
    hook = (resid_hook(layer), _writer(positions, clean_resid[:, positions]))
    return model.forward(corrupted_embeds, fwd_hooks=[hook]).logits


@dataclass
class IterativeResult:
    """logits [batch, seq, d_vocab] of the last pass; regenerated [batch, passes, d_model]: the
    activation at layer L read in pass j at the position after latent j (after the last latent: eot);
    passes: how many forward passes ran (N + 1)."""

    logits: Tensor
    regenerated: Tensor
    passes: int


@torch.no_grad()
def iterative_patch(model: LatentModel, corrupted_embeds: Tensor, clean_resid: Tensor, layer: int, positions: Sequence[int], carry: Literal["clean", "regenerated"] = "clean") -> IterativeResult:
    """The earlier iterative patcher: passes j = 0..N over the corrupted inputs [batch, seq, d_model],
    `positions` = the absolute positions of latents 0..N, clean_resid [batch, seq, d_model] the clean
    run's `blocks.{layer}.hook_resid_post`.

    carry="clean" (the earlier procedure): pass j writes the CLEAN activation at every latent <= j.
    carry="regenerated" (step (a) ablated): pass j writes the clean activation at latent j (and at
    latent 0, which no pass regenerates) and, at each latent 0 < i < j, the activation that pass i-1
    regenerated there. Each pass reads the activation at the position after latent j. The outputs
    are the last pass's.
    """
    positions = list(positions)
    name, regenerated = resid_hook(layer), []
    for j, _ in enumerate(positions):
        values = clean_resid[:, positions[: j + 1]].clone()
        if carry == "regenerated":
            for i in range(1, j):
                values[:, i] = regenerated[i - 1]
        elif carry != "clean":
            raise ValueError(f"carry must be 'clean' or 'regenerated', got {carry!r}")
        store: list[Tensor] = []
        logits = model.forward(corrupted_embeds, fwd_hooks=[(name, _writer(positions[: j + 1], values, positions[j] + 1, store))]).logits
        regenerated.append(store[0])
    return IterativeResult(logits, torch.stack(regenerated, dim=1), len(positions))


@torch.no_grad()
def loop_patch(model: LatentModel, corrupted_questions: Sequence[str], clean_resid: Tensor, layer: int, positions: Sequence[int], answer_ids: Tensor | None = None) -> Tensor:
    """The real iterative strategy: the latent loop re-run on the corrupted questions (one token
    length) with the clean `blocks.{layer}.hook_resid_post` (clean_resid [batch, seq, d_model]) written
    at `positions` in the pass that computes each, so every later thought is made from the patched
    state; then one teacher-forced pass with the same writes. Returns logits [batch, seq, d_vocab]."""
    hooks = [(resid_hook(layer), at_positions(_writer([0], clean_resid[:, p : p + 1]), p)) for p in positions]
    embeds = loop_embeds(model, corrupted_questions, answer_ids, hooks)
    return model.forward(embeds, fwd_hooks=hooks).logits


# ----------------------------------------------------------------------------- steps 3 and 4: the metrics


def kl_per_position(reference_logits: Tensor, patched_logits: Tensor) -> Tensor:
    """KL(reference || patched) in nats at every position, logits [..., seq, d_vocab] -> [..., seq]
    (float64; `interp.metrics.kl_divergence` at each position)."""
    p = reference_logits.double().log_softmax(-1)
    q = patched_logits.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def question_kl(clean_logits: Tensor, patched_logits: Tensor, layout: SequenceLayout) -> Tensor:
    """The earlier step 3: KL(clean || patched) averaged over the question positions, logits
    [batch, seq, d_vocab] -> [batch]. No patch after the question can change it (causal attention)."""
    return kl_per_position(clean_logits[:, : layout.n_question], patched_logits[:, : layout.n_question]).mean(-1)


def after_latents_kl(clean_logits: Tensor, patched_logits: Tensor, layout: SequenceLayout) -> Tensor:
    """Step 3 replaced: KL(clean || patched) averaged over eot and every later position (the
    positions that read every latent), logits [batch, seq, d_vocab] -> [batch]."""
    return kl_per_position(clean_logits[:, layout.eot :], patched_logits[:, layout.eot :]).mean(-1)


def template_logit_diff(logits: Tensor, layout: SequenceLayout, clean_tokens: Tensor, corrupted_tokens: Tensor) -> Tensor:
    """The earlier step 4: at the position whose next token is the answer prefix's first token ("The":
    `layout.decode_start`, eot or its suffix), logit(clean token) - logit(corrupted token); logits
    [batch, seq, d_vocab], tokens [batch] (the answers' first tokens) -> [batch]. Where both answers
    start with the same token (Llama-3 writes " 16" as " " + "16") it is 0 whatever the logits."""
    return _diff(logits[:, layout.decode_start], clean_tokens, corrupted_tokens)


def answer_logit_diff(logits: Tensor, clean_tokens: Tensor, corrupted_tokens: Tensor) -> Tensor:
    """Step 4 replaced: at the last position (the answer prefix and the answers' common tokens
    teacher-forced), logit(clean token) - logit(corrupted token) of the answers' first DIFFERING
    tokens; logits [batch, seq, d_vocab], tokens [batch] -> [batch]."""
    return _diff(logits[:, -1], clean_tokens, corrupted_tokens)


def _diff(at: Tensor, clean_tokens: Tensor, corrupted_tokens: Tensor) -> Tensor:
    rows = torch.arange(len(at))
    return (at[rows, clean_tokens] - at[rows, corrupted_tokens]).double()


def regenerated_cosine(regenerated: Tensor, reference_resid: Tensor, positions: Sequence[int]) -> Tensor:
    """Cosine of each regenerated activation with a run's activation at the same position:
    regenerated [batch, n, d_model], reference_resid [batch, seq, d_model], positions the n positions
    read (the position after each latent) -> [batch, n]."""
    ref = reference_resid[:, list(positions)]
    return torch.nn.functional.cosine_similarity(regenerated.double(), ref.double(), dim=-1)


# ----------------------------------------------------------------------------- the procedure


@dataclass
class _Group:
    """Pairs whose sequences share one layout, run in one batch."""

    pairs: list[Pair]
    layout: SequenceLayout
    common: Tensor  # [n_answer] the answers' common first tokens, teacher-forced (the same for every pair of the group)
    first: tuple[Tensor, Tensor]  # [batch] the clean / corrupted answers' first tokens (step 4)
    differing: tuple[Tensor, Tensor]  # [batch] the clean / corrupted answers' first differing tokens


def check_layers(model: LatentModel, layers: Sequence[int] | None) -> list[int]:
    """The layers to patch (default all), refused (ValueError) when out of range or repeated."""
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else list(layers)
    if not layers:
        raise ValueError(f"no layers given; give one or more of 0..{n - 1} (or None for all)")
    bad = [layer for layer in layers if not isinstance(layer, int) or not 0 <= layer < n]
    if bad:
        raise ValueError(f"layer {bad[0]!r} out of range: the model has layers 0..{n - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} repeat a layer; give each once")
    return layers


def _groups(model: LatentModel, pairs: Sequence[Pair]) -> list[_Group]:
    """Check the pairs and group them by layout (ValueError naming the first bad pair)."""
    if not pairs:
        raise ValueError("no pairs: give at least one clean/corrupted pair (interp.data.arithmetic_pairs makes some)")
    if model.num_latents < 1:
        raise ValueError(f"the model runs {model.num_latents} latents; the procedure patches latents, so it needs 1 or more")
    by_key: dict[tuple, list] = {}
    for pair in pairs:
        n_clean, n_corrupted = len(model.encode(pair.clean_question)), len(model.encode(pair.corrupted_question))
        if n_clean != n_corrupted:
            raise ValueError(
                f"pair {pair.id!r}: its questions have different token lengths (clean {n_clean}, corrupted {n_corrupted}), so positions do not line up; "
                "keep pairs whose questions tokenize to the same length (interp.data.align_to_model)"
            )
        clean_ids, corrupted_ids = model.answer_token_ids(pair.clean_answer), model.answer_token_ids(pair.corrupted_answer)
        try:
            i = first_difference(clean_ids.tolist(), corrupted_ids.tolist())
        except ValueError as exc:
            raise ValueError(f"pair {pair.id!r}: {exc}") from None
        common = clean_ids[:i]
        by_key.setdefault((n_clean, tuple(common.tolist())), []).append((pair, clean_ids, corrupted_ids, i))
    groups = []
    for (n_q, common), items in by_key.items():
        for s in range(0, len(items), MAX_BATCH):
            chunk = items[s : s + MAX_BATCH]
            first = (torch.tensor([int(c[0]) for _, c, _, _ in chunk]), torch.tensor([int(k[0]) for _, _, k, _ in chunk]))
            differing = (torch.tensor([int(c[i]) for _, c, _, i in chunk]), torch.tensor([int(k[i]) for _, _, k, i in chunk]))
            groups.append(_Group([p for p, *_ in chunk], model.layout(n_q, len(common)), torch.tensor(common, dtype=torch.long), first, differing))
    return groups


def _inputs(model: LatentModel, group: _Group, variant: Variant) -> tuple[Tensor, Tensor]:
    """Clean and corrupted input embeddings [batch, seq, d_model] of a group."""
    if variant == "loop":
        return tuple(loop_embeds(model, [getattr(p, f"{side}_question") for p in group.pairs], group.common) for side in ("clean", "corrupted"))
    return tuple(model.embed(torch.stack([pad_sequence(model, getattr(p, f"{side}_question"), group.common)[0] for p in group.pairs])) for side in ("clean", "corrupted"))


def _metrics(group: _Group, clean_logits: Tensor, logits: Tensor) -> dict[str, Tensor]:
    layout = group.layout
    return {
        "kl": question_kl(clean_logits, logits, layout),
        "logit_diff": template_logit_diff(logits, layout, *group.first),
        "kl_after_latents": after_latents_kl(clean_logits, logits, layout),
        "answer_logit_diff": answer_logit_diff(logits, *group.differing),
    }


@torch.no_grad()
def earlier_procedure(model: LatentModel, pairs: Sequence[Pair], layers: Sequence[int] | None = None, *, variant: Variant = "earlier") -> pd.DataFrame:
    """The earlier study's procedure on `pairs`: one row per (pair, layer, N, procedure).

    variant: "earlier" (as the study ran it), "regenerated" (step (a) ablated: the iterative patcher
    feeds what it regenerated instead of re-writing the clean activations) or "loop" (step 1 ablated:
    the model's real latent loop instead of pads; iterative = the loop re-run with the patch, parallel =
    the corrupted run's thoughts held). `layers`: default all.

    Columns: pair_id, variant, layer, n (the last patched latent: latents 0..n are patched), procedure
    (parallel | iterative), the metrics `kl` (earlier step 3: question positions), `logit_diff` (earlier
    step 4: the "The" position), `kl_after_latents`, `answer_logit_diff`, each also of the unpatched
    corrupted run (`corrupted_<metric>`), and for the pad variants' iterative rows `passes` (N + 1),
    `regen_cos` (mean cosine of the regenerated activations with the clean run's: the study's "similar
    to clean") and `regen_vs_corrupted` (max |regenerated - corrupted run's activation|: 0).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    layers = check_layers(model, layers)
    rows = []
    for group in _groups(model, pairs):
        layout = group.layout
        clean_embeds, corrupted_embeds = _inputs(model, group, variant)
        clean = model.forward(clean_embeds, with_cache=True, names_filter=[resid_hook(layer) for layer in layers])
        corrupted = model.forward(corrupted_embeds, with_cache=True, names_filter=[resid_hook(layer) for layer in layers])
        base = {f"corrupted_{k}": v for k, v in _metrics(group, clean.logits, corrupted.logits).items()}
        ids = [p.id for p in group.pairs]
        for layer in layers:
            clean_resid, corrupted_resid = clean.cache[resid_hook(layer)], corrupted.cache[resid_hook(layer)]
            for n in range(model.num_latents):
                positions = layout.latent_positions[: n + 1]
                extra: dict[str, Tensor] = {}
                if variant == "loop":
                    runs = {"parallel": parallel_patch(model, corrupted_embeds, clean_resid, layer, positions)}
                    runs["iterative"] = loop_patch(model, [p.corrupted_question for p in group.pairs], clean_resid, layer, positions, group.common)
                else:
                    runs = {"parallel": parallel_patch(model, corrupted_embeds, clean_resid, layer, positions)}
                    it = iterative_patch(model, corrupted_embeds, clean_resid, layer, positions, carry="clean" if variant == "earlier" else "regenerated")
                    runs["iterative"] = it.logits
                    read = [p + 1 for p in positions]
                    extra = {
                        "passes": torch.full((len(ids),), it.passes),
                        "regen_cos": regenerated_cosine(it.regenerated, clean_resid, read).mean(-1),
                        "regen_vs_corrupted": (it.regenerated - corrupted_resid[:, read]).abs().flatten(1).max(-1).values,
                    }
                for procedure, logits in runs.items():
                    values = _metrics(group, clean.logits, logits) | base | (extra if procedure == "iterative" else {})
                    for r, pair_id in enumerate(ids):
                        row = {"pair_id": pair_id, "variant": variant, "layer": layer, "n": n, "procedure": procedure}
                        rows.append(row | {k: v[r].item() for k, v in values.items()})
    return pd.DataFrame(rows)


def ablation_rows(model: LatentModel, pairs: Sequence[Pair], layers: Sequence[int] | None = None) -> pd.DataFrame:
    """`earlier_procedure` under every variant, concatenated (column `variant`)."""
    return pd.concat([earlier_procedure(model, pairs, layers, variant=v) for v in VARIANTS], ignore_index=True)


def iterative_minus_parallel(rows: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Paired differences iterative - parallel of `metrics`, one row per (variant, pair, layer, n)."""
    keys = [k for k in ("variant", "pair_id", "layer", "n") if k in rows.columns]
    wide = rows.pivot_table(index=keys, columns="procedure", values=list(metrics), aggfunc="first")
    return pd.DataFrame({m: wide[(m, "iterative")] - wide[(m, "parallel")] for m in metrics}).reset_index()


#: the ablation table's rows: (step ablated, the variant whose runs it reads, its KL column, its logit-difference column)
ABLATIONS = (
    ("none: the earlier procedure", "earlier", "kl", "logit_diff"),
    ("(a) iterative carries what it regenerated, not re-written clean values", "regenerated", "kl", "logit_diff"),
    ("(1) real latent loop instead of pad inputs", "loop", "kl", "logit_diff"),
    ("(b) KL over eot and after, not the question", "earlier", "kl_after_latents", "logit_diff"),
    ("(c) logit diff at the answer's differing token, not at 'The'", "earlier", "kl", "answer_logit_diff"),
    ("all: real loop, KL after the latents, answer token", "loop", "kl_after_latents", "answer_logit_diff"),
)


def ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per ablated step (`ABLATIONS`), from `ablation_rows`' rows.

    Columns: `max |it-par| kl`, `max |it-par| ld` (the largest iterative - parallel difference over
    pairs, layers and N: 0 means the two strategies cannot be told apart), and `mean |effect| kl`,
    `mean |effect| ld` (mean over both procedures of |metric - the unpatched corrupted run's|: 0 means
    the metric cannot see the patch at all).
    """
    out = []
    for step, variant, kl, ld in ABLATIONS:
        sub = rows[rows.variant == variant]
        if sub.empty:
            continue
        diff = iterative_minus_parallel(sub, (kl, ld))
        out.append(
            {
                "step ablated": step,
                "KL metric": kl,
                "logit-diff metric": ld,
                "max |it-par| kl": diff[kl].abs().max(),
                "max |it-par| ld": diff[ld].abs().max(),
                "mean |effect| kl": (sub[kl] - sub[f"corrupted_{kl}"]).abs().mean(),
                "mean |effect| ld": (sub[ld] - sub[f"corrupted_{ld}"]).abs().mean(),
            }
        )
    return pd.DataFrame(out)


def strategy_gap(sweep_rows: pd.DataFrame, metric: str = "logit_diff", by: str = "layer") -> pd.DataFrame:
    """From `interp.sweep` rows (strategies parallel and iterative): mean and max of
    |metric(iterative) - metric(parallel)| per `by`, paired by (pair, layer, kind, latents)."""
    df = sweep_rows.assign(latents=sweep_rows.latents.map(tuple))
    wide = df.pivot_table(index=["pair_id", "layer", "kind", "latents"], columns="strategy", values=metric, aggfunc="first")
    gap = (wide["iterative"] - wide["parallel"]).abs().rename("gap").reset_index()
    return gap.groupby(by)["gap"].agg(["mean", "max"]).rename(columns={"mean": f"mean |it-par| {metric}", "max": f"max |it-par| {metric}"})


def earlier_summary(rows: pd.DataFrame) -> dict[str, float]:
    """The earlier study's headline numbers from `earlier_procedure` rows (variant "earlier"): the
    largest |iterative - parallel| of `kl` and `logit_diff` over pairs, layers and N, each metric's
    mean (and the logit difference's standard deviation) per procedure, and the regenerated
    activations' mean and least cosine with the clean run's and largest distance from the corrupted run's."""
    rows = rows[rows.variant == "earlier"]
    diff = iterative_minus_parallel(rows, ("kl", "logit_diff"))
    it, par = rows[rows.procedure == "iterative"], rows[rows.procedure == "parallel"]
    return {
        "max |it-par| kl": float(diff.kl.abs().max()),
        "max |it-par| logit_diff": float(diff.logit_diff.abs().max()),
        "kl iterative": float(it.kl.mean()),
        "kl parallel": float(par.kl.mean()),
        "logit_diff iterative": float(it.logit_diff.mean()),
        "logit_diff parallel": float(par.logit_diff.mean()),
        "logit_diff std": float(rows.logit_diff.std()),
        "regen cos mean": float(it.regen_cos.mean()),
        "regen cos min": float(it.regen_cos.min()),
        "max |regen - corrupted|": float(it.regen_vs_corrupted.max()),
    }


def loop_vs_sweep(rows: pd.DataFrame, sweep_rows: pd.DataFrame) -> float:
    """Largest |answer_logit_diff| difference between the "loop" variant's rows and `interp.sweep`'s
    cumulative rows (latents 0..n) of the same pairs, layers and strategies: the same runs, so float rounding."""
    loop = rows[rows.variant == "loop"]
    sweep_rows = sweep_rows[sweep_rows.kind == "cumulative"]
    s = sweep_rows.assign(n=sweep_rows.latents.map(len) - 1).rename(columns={"strategy": "procedure"})
    both = loop.merge(s[["pair_id", "layer", "n", "procedure", "logit_diff"]], on=["pair_id", "layer", "n", "procedure"], suffixes=("", "_sweep"))
    if both.empty:
        raise ValueError("no rows in common: run interp.sweep with kinds including 'cumulative' on the same pairs, layers and strategies")
    return float((both.answer_logit_diff - both.logit_diff_sweep).abs().max())
