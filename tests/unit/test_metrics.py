"""The metrics against values worked out with numpy."""

from __future__ import annotations

import numpy as np
import torch

from interp.engine import PositionCache
from interp.metrics import cache_similarity, kl_divergence


class Cache(dict):
    """What cache_similarity reads of an ActivationCache: `cache_dict` and `[name]`."""

    @property
    def cache_dict(self):
        return self


def test_cache_similarity_per_layer_and_position():
    """Cosine and relative L2 per (layer, position), heads flattened, the second cache the reference;
    a PositionCache (as sweeps capture) reads the same as the full activations."""
    rng = np.random.default_rng(0)
    a = {f"blocks.{layer}.attn.hook_z": rng.normal(size=(1, 5, 2, 3)) for layer in range(3)}
    b = {f"blocks.{layer}.attn.hook_z": rng.normal(size=(1, 5, 2, 3)) for layer in range(3)}
    positions = [1, 4]
    want_cos, want_rel = np.zeros((3, 2)), np.zeros((3, 2))
    for layer in range(3):
        for i, p in enumerate(positions):
            x, y = a[f"blocks.{layer}.attn.hook_z"][0, p].ravel(), b[f"blocks.{layer}.attn.hook_z"][0, p].ravel()
            want_cos[layer, i] = x @ y / np.linalg.norm(x) / np.linalg.norm(y)
            want_rel[layer, i] = np.linalg.norm(x - y) / np.linalg.norm(y)
    full = {name: torch.tensor(v, dtype=torch.float32) for name, v in a.items()}
    ref = {name: torch.tensor(v, dtype=torch.float32) for name, v in b.items()}
    compact = PositionCache({name: v[0, positions] for name, v in full.items()}, positions, seq_len=5)
    for cache in (Cache(full), compact):
        got = cache_similarity(cache, Cache(ref), "attn.hook_z", positions)
        np.testing.assert_allclose(got["cos"].numpy(), want_cos, rtol=1e-5)
        np.testing.assert_allclose(got["rel_l2"].numpy(), want_rel, rtol=1e-5)


def test_kl_divergence_by_hand():
    p, q = np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.5, 0.25])
    want = float((p * np.log(p / q)).sum())
    got = kl_divergence(torch.tensor(np.log(p)), torch.tensor(np.log(q) + 3.0))  # logits up to a constant
    assert abs(got - want) < 1e-12
