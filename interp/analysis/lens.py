"""Logit lens by layer: what each (layer, position) residual says through the unembedding.

The residual is read as the model reads its last layer: through the final norm (`ln_final`, the
norm whose output `LatentModel.forward` projects into the next latent) and the unembedding, over
the ids the model may emit (< eot, as `LatentModel.decode_latents`). At the last layer this is
exactly the model's own logits. For each target value (`step[k]`, `answer`) the lens scores the
first token of the value as written (`value_token`): its rank (1 = the top token) and probability.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from interp.analysis.activations import Activations, value_token
from interp.model import LatentModel


@torch.no_grad()
def lens_logits(model: LatentModel, resid: Tensor, batch: int = 4096) -> Tensor:
    """Residuals [..., d_model] -> logits [..., decode_vocab]: `unembed(ln_final(resid))`, float32 on the CPU."""
    flat = resid.reshape(-1, resid.shape[-1])
    out = []
    for i in range(0, len(flat), batch):
        x = flat[i : i + batch].to(model.device, model.cfg.dtype)[None]
        out.append(model.model.unembed(model.model.ln_final(x))[0, :, : model.decode_vocab].float().cpu())
    return torch.cat(out).reshape(*resid.shape[:-1], -1)


def target_tokens(model: LatentModel, acts: Activations) -> dict[str, Tensor]:
    """target name -> [n] first token of each problem's value (-1 where the problem has no such step)."""
    names = sorted({t for p in acts.problems for t in p.targets}, key=_target_order)
    return {t: torch.tensor([value_token(model.tokenizer, p.targets[t]) if t in p.targets else -1 for p in acts.problems]) for t in names}


def _target_order(name: str) -> tuple[int, int]:
    return (1, 0) if name == "answer" else (0, int(name[5:-1]))


def lens_rows(logits: Tensor, layers: Sequence[int], positions: Sequence[str], targets: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Per (layer, position, target): top1_rate, mean_rank (1 = top), mean_prob over the problems
    that have the target. logits [n, len(layers), len(positions), vocab]; targets name -> [n] ids (-1: none)."""
    probs = logits.float().softmax(-1)
    rows = []
    for li, layer in enumerate(layers):
        for pi, position in enumerate(positions):
            at = logits[:, li, pi]  # [n, vocab]
            for target, ids in targets.items():
                have = ids >= 0
                if not have.any():
                    continue
                own = at[have].gather(1, ids[have, None])  # [m, 1]
                rank = (at[have] > own).sum(-1) + 1
                rows.append(
                    {
                        "layer": layer,
                        "position": position,
                        "target": target,
                        "top1_rate": float((rank == 1).float().mean()),
                        "mean_rank": float(rank.float().mean()),
                        "mean_prob": float(probs[have, li, pi].gather(1, ids[have, None]).mean()),
                        "n": int(have.sum()),
                    }
                )
    return rows


def top_token_rows(logits: Tensor, layers: Sequence[int], positions: Sequence[str], decode, k: int = 3) -> list[dict[str, Any]]:
    """Per (layer, position): the k tokens most often on top across problems, with their rates.
    `decode(id) -> str` names a token."""
    rows = []
    n = logits.shape[0]
    for li, layer in enumerate(layers):
        for pi, position in enumerate(positions):
            counts = Counter(logits[:, li, pi].argmax(-1).tolist())
            rows.append({"layer": layer, "position": position, "top": [[decode(i), c / n] for i, c in counts.most_common(k)]})
    return rows


def logit_lens(model: LatentModel, acts: Activations) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(lens rows, top-token rows) for collected activations (see `lens_rows`, `top_token_rows`)."""
    logits = lens_logits(model, acts.resid)
    rows = lens_rows(logits, acts.layers, acts.positions, target_tokens(model, acts))
    return rows, top_token_rows(logits, acts.layers, acts.positions, lambda i: model.tokenizer.decode([i]))
