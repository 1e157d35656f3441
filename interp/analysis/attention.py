"""Attention flow between the parts of a CODI sequence, and attention knockout.

`attention_rows`: the weight each query position (`latent[t]`, `eot`, `answer`) puts on each key
group (`question` summed over its tokens, `bot`, `latent[j]`, `eot`, `prefix`), per layer and
head, averaged over problems (from `interp.analysis.activations.collect`).

`knockout_generate`: the real latent loop and greedy answer with edges of the attention graph
cut: for query positions in one group and key positions in another, at the chosen layers, the
pre-softmax score is set to -inf (so the query's weight is spread over its other keys). Only
edges to strictly earlier positions are cut (a position always keeps itself). The hook acts in
every forward pass of the loop, so when an edge into a latent is cut that latent's state, the
latents projected from it and the answer are all regenerated. Groups, by absolute column of the
left-padded batch `generate_batch` runs (`width` = padded prompt length, bot its last column):
`question` (every column before bot), `bot`, `latent[t]`, `latents` (all of them), `eot`, and
`answer` (eot and every position after it: where the answer is read out and written).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from interp.analysis.activations import Activations, Problem
from interp.layout import SequenceLayout
from interp.model import Generation, LatentModel

ALL_LAYERS = "all"


def attention_rows(acts: Activations) -> list[dict[str, Any]]:
    """Rows {layer, head, query, key, weight}: mean over problems of the grouped attention weight;
    keys after the query are left out (their weight is 0)."""
    mean = acts.attention.mean(dim=0)  # [layers, heads, queries, keys]
    order = {name: i for i, name in enumerate(acts.keys)}
    rows = []
    for layer in range(mean.shape[0]):
        for head in range(mean.shape[1]):
            for qi, query in enumerate(acts.queries):
                last = order["prefix"] if query == "answer" else order[query]
                for ki, key in enumerate(acts.keys[: last + 1]):
                    rows.append({"layer": layer, "head": head, "query": query, "key": key, "weight": float(mean[layer, head, qi, ki])})
    return rows


def group_columns(name: str, width: int, num_latents: int) -> tuple[int, int]:
    """[lo, hi) columns of a group in a batch whose padded prompt is `width` long (hi may be a large number).

    Positions come from the layout of the padded batch (bot in column width - 1): `question` = every
    column before bot, `bot`, `latent[t]`, `latents` = all of them, `eot`, `answer` = eot and every
    column after it (what writes the answer)."""
    layout = SequenceLayout(n_question=width - 1, num_latents=num_latents, n_prefix=0)
    spans = {"question": (0, layout.bot), "latents": (layout.n_prompt, layout.eot), "answer": (layout.eot, 1 << 30)}
    spans.update({name: (layout.position(name), layout.position(name) + 1) for name in ("bot", "eot", *(layout.name(p) for p in layout.latent_positions))})
    if name not in spans:
        raise ValueError(f"unknown position group {name!r}; use question, bot, latent[t] (t < {num_latents}), latents, eot or answer")
    return spans[name]


def knockout_hooks(edges: Sequence[tuple[str, str]], layers: Sequence[int], width: int, num_latents: int) -> list[tuple[str, Any]]:
    """Hooks on `blocks.{L}.attn.hook_attn_scores` that cut every (query group, key group) edge.

    The scores are [batch, head, query, key] with keys covering the KV cache and the chunk, so the
    chunk's first query sits at column `keys - queries`: the same hook serves the prompt, each
    latent step and each decode step.
    """
    ranges = [(group_columns(q, width, num_latents), group_columns(k, width, num_latents)) for q, k in edges]

    def cut(scores: Tensor, hook) -> Tensor:
        n_q, n_k = scores.shape[-2:]
        qcol = torch.arange(n_k - n_q, n_k, device=scores.device)[:, None]
        kcol = torch.arange(n_k, device=scores.device)[None, :]
        blocked = torch.zeros(n_q, n_k, dtype=torch.bool, device=scores.device)
        for (qlo, qhi), (klo, khi) in ranges:
            blocked |= (qcol >= qlo) & (qcol < qhi) & (kcol >= klo) & (kcol < khi) & (kcol < qcol)
        return scores.masked_fill(blocked, float("-inf")) if blocked.any() else scores

    return [(f"blocks.{layer}.attn.hook_attn_scores", cut) for layer in layers]


def prompt_width(model: LatentModel, questions: Sequence[str]) -> int:
    """The padded prompt length (question, its suffix, bot) `generate_batch` runs these questions with."""
    return max(model.layout(len(model.encode(q))).n_prompt for q in questions)


@torch.no_grad()
def knockout_generate(model: LatentModel, questions: Sequence[str], edges: Sequence[tuple[str, str]], layers: Sequence[int] | None = None, batch_size: int = 64) -> list[Generation]:
    """Generations with the (query group, key group) `edges` cut at `layers` (default: every layer)."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    out = []
    for i in range(0, len(questions), batch_size):
        batch = questions[i : i + batch_size]
        hooks = knockout_hooks(edges, layers, prompt_width(model, batch), model.num_latents)
        out += model.generate_batch(batch, fwd_hooks=hooks)
    return out


def standard_edges(num_latents: int) -> dict[str, list[tuple[str, str]]]:
    """The edge sets `knockout_rows` cuts: name -> [(query group, key group)]."""
    edges = {
        "question -> latents": [("latents", "question")],
        "bot -> latents": [("latents", "bot")],
        "latents -> latents": [("latents", "latents")],
        "question -> answer": [("answer", "question")],
        "latents -> answer": [("answer", "latents")],
    }
    edges.update({f"latent[{t}] -> answer": [("answer", f"latent[{t}]")] for t in range(num_latents)})
    return edges


def knockout_rows(
    model: LatentModel,
    problems: Sequence[Problem],
    baseline: Sequence[Generation],
    *,
    edges: dict[str, list[tuple[str, str]]] | None = None,
    per_layer: bool = True,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Rows {edge, cut, layer, accuracy, baseline_accuracy, changed, n} per edge set and layer
    (`all` = every layer at once; with `per_layer` also each layer alone). `changed`: the fraction
    of answers that differ from the unablated `baseline` generations of the same problems."""
    edges = standard_edges(model.num_latents) if edges is None else edges
    questions = [p.question for p in problems]
    base_acc = _accuracy(baseline, problems)
    layer_sets: list[tuple[Any, list[int]]] = [(ALL_LAYERS, list(range(model.cfg.n_layers)))]
    if per_layer:
        layer_sets += [(layer, [layer]) for layer in range(model.cfg.n_layers)]
    rows = []
    for name, cut in edges.items():
        for label, layers in layer_sets:
            gens = knockout_generate(model, questions, cut, layers, batch_size)
            rows.append(
                {
                    "edge": name,
                    "cut": [list(e) for e in cut],
                    "layer": label,
                    "accuracy": _accuracy(gens, problems),
                    "baseline_accuracy": base_acc,
                    "changed": sum(g.answer != b.answer for g, b in zip(gens, baseline)) / len(gens),
                    "n": len(gens),
                }
            )
    return rows


def _accuracy(gens: Sequence[Generation], problems: Sequence[Problem]) -> float:
    return sum(g.answer == p.answer for g, p in zip(gens, problems)) / len(problems)
