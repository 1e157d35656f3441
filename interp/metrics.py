"""Patching metrics: small pure functions, tensors in, numbers out."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from transformer_lens import ActivationCache

from interp.hooks import layer_of


def first_difference(clean_ids: Sequence[int], corrupted_ids: Sequence[int]) -> int:
    """Index of the first token where two answers' token ids differ.

    Llama-3 writes " 16" as " " + "16", so two answers usually share their first token; the
    scored token is the first one that tells them apart. Raises if one is a prefix of the other.
    """
    for i, (a, b) in enumerate(zip(clean_ids, corrupted_ids)):
        if a != b:
            return i
    raise ValueError(f"answers {list(clean_ids)} and {list(corrupted_ids)} share all their tokens up to the shorter one's end, so no token tells them apart; drop this pair (interp.data.align does)")


def logit_diff(logits: Tensor, clean_token: int, corrupted_token: int) -> float:
    """logits [d_vocab]: logit of the clean answer's token minus the corrupted answer's token."""
    return float(logits[clean_token] - logits[corrupted_token])


def normalized_effect(patched: float, clean: float, corrupted: float) -> float:
    """(patched - corrupted) / (clean - corrupted): 0 = no effect, 1 = fully restores the clean run.

    NaN when clean and corrupted are indistinguishable (|clean - corrupted| < 1e-6).
    """
    denom = clean - corrupted
    return (patched - corrupted) / denom if abs(denom) >= 1e-6 else math.nan


def kl_divergence(clean_logits: Tensor, patched_logits: Tensor, vocab_limit: int | None = None) -> float:
    """KL(clean || patched) in nats between next-token distributions, logits [d_vocab].

    `vocab_limit` restricts both to ids < limit (the tokens the model may emit, ids < eot).
    """
    p = clean_logits[:vocab_limit].double().log_softmax(-1)
    q = patched_logits[:vocab_limit].double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def answer_flip(patched_answer: float | None, clean_answer: float | None) -> bool:
    """True when the decoded answer after the patch equals the clean run's answer."""
    return patched_answer is not None and clean_answer is not None and patched_answer == clean_answer


def cache_similarity(a: ActivationCache, b: ActivationCache, family: str, positions: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Per-(layer, position) cosine similarity and relative L2 of a hook family in two caches.

    `family` is a hook suffix present in every block (`hook_resid_post`, `attn.hook_z`, ...).
    Activations are flattened over everything after the position axis (heads too). Returns
    {"cos": [n_layers, n_positions], "rel_l2": [n_layers, n_positions]} with
    rel_l2 = |a - b| / |b| (b is the reference, e.g. the clean run).
    """
    layers = sorted({layer_of(k) for k in a.cache_dict if layer_of(k) is not None and k.endswith("." + family)})
    if not layers:
        raise KeyError(f"no hook blocks.*.{family} in the cache")
    at = list(positions) if positions is not None else slice(None)
    x, y = (torch.stack([cache[f"blocks.{layer}.{family}"][0][at] for layer in layers]).flatten(2).double() for cache in (a, b))  # [n_layers, n_positions, features]
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    rel = (x - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)
    return {"cos": cos.float(), "rel_l2": rel.float()}
