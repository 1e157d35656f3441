"""What a sweep runs: units of work (pair, layer, latent set) and their test ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("single", "all", "cumulative")


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


def units(config, n_pairs: int, n_layers: int, n_latents: int) -> list[Unit]:
    """Every unit of a sweep (`config.layers`, default every layer; `config.kinds`), pair by pair."""
    layers: Sequence[int] = config.layers if config.layers is not None else range(n_layers)
    return [Unit(p, layer, kind, latents) for p in range(n_pairs) for layer in layers for kind in config.kinds for latents in latent_sets(kind, n_latents)]


def batch_order(unit: Unit) -> tuple:
    """Sort key for the engine: units that patch only late latents share batches that start
    late (less to recompute); ties by layer, latent set and pair."""
    return (min(unit.latents), unit.layer, unit.kind, unit.latents, unit.pair_index)
