"""`patch`: one intervention on one pair, the notebook entry point to the engine (`interp.engine`).

Strategies (full definitions in `interp.engine`): `parallel` (fed latents held at the corrupted
run's: the written value reaches later positions only through attention), `iterative` (the latent
loop re-run: through attention and through the projection into the next fed latent), `feedback`
(only through the projection: later positions attend to the site's unpatched activation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from interp.engine import (
    STRATEGIES,
    BatchPatcher,
    Job,
    PatchError,
    PatchResult,
    Site,
    Strategy,
    check_aligned,
    check_hook,
    full_cache_pass,
    layer_of,
)
from interp.hooks import hook_name
from interp.interventions import Intervention, as_intervention
from interp.layout import MAX_NEW_TOKENS
from interp.model import LatentModel, Trace

__all__ = ["STRATEGIES", "PatchError", "PatchResult", "Site", "Strategy", "check_aligned", "check_hook", "latent_sites", "layer_of", "patch", "patch_sites"]


def latent_sites(trace: Trace, hook: str, latents: int | Sequence[int], head: int | None = None) -> Site:
    """A site at the positions of latent indices `latents` (0-based) of `trace`."""
    latents = _latent_indices(latents)
    k = len(trace.latent_positions)
    bad = [t for t in latents if not 0 <= t < k]
    if bad:
        raise PatchError(f"latent index {bad[0]} out of range: latents are 0..{k - 1}")
    return Site(hook, tuple(trace.latent_positions[t] for t in latents), head)


def _latent_indices(latents: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(latents, int):
        return (latents,)
    if isinstance(latents, (str, bytes)) or not all(isinstance(t, int) for t in latents):
        raise PatchError(f"latents must be an int or a sequence of ints (0-based latent indices), got {latents!r}")
    if len(set(latents)) != len(latents):
        raise PatchError(f"latents {list(latents)} repeat an index")
    return tuple(latents)


def patch_sites(
    model: LatentModel,
    corrupted: Trace,
    clean: Trace,
    sites: Sequence[Site],
    strategy: Strategy = "parallel",
    *,
    intervention: Intervention | Callable | None = None,
    with_cache: bool = True,
    decode: bool = True,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> PatchResult:
    """Run the corrupted trace with `intervention` at `sites`, by `strategy` (a batch of one)."""
    job = Job(tuple(sites), strategy, intervention=as_intervention(intervention))
    result = BatchPatcher(model, [(corrupted, clean)], batch_size=1, max_new_tokens=max_new_tokens, decode=decode).run([job])[0]
    if with_cache:
        with torch.no_grad():
            result.cache = full_cache_pass(model, corrupted, clean, job, result.latents)
    return result


def patch(
    model: LatentModel,
    corrupted: Trace,
    clean: Trace,
    hook: str | tuple[str, int],
    latents: int | Sequence[int],
    strategy: Strategy = "parallel",
    *,
    head: int | None = None,
    intervention: Intervention | Callable | None = None,
    with_cache: bool = True,
) -> PatchResult:
    """Apply `intervention` at `hook` to the corrupted run at latent indices `latents`.

    `hook` is a TransformerLens hook name (`blocks.{L}.hook_resid_post`, `blocks.{L}.attn.hook_z`
    with `head`) or a `(name, layer)` tuple as `transformer_lens.utils.get_act_name` takes it;
    `latents` an int or a sequence of 0-based latent indices; `strategy` "parallel", "iterative"
    or "feedback"; `intervention` `interp.Clean()` (default), `Mean(traces)`, `Zero()`,
    `Add(vector, scale)` or a function `(activation, clean_activation) -> activation`.
    `result.cache` is an `ActivationCache` of the patched run (see `interp.engine.full_cache_pass`).
    """
    site = latent_sites(corrupted, hook_name(hook), latents, head)
    return patch_sites(model, corrupted, clean, [site], strategy, intervention=intervention, with_cache=with_cache)
