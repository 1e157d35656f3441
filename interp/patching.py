"""Activation patching over CODI's latent loop: one engine, the strategy is a switch.

A patch is data: `Site(hook, positions, head)` says where the clean activation is written; the
engine turns sites into TransformerLens hooks and asks `CodiModel` to run.

- parallel: one pass over the corrupted sequence with its latent inputs held at the corrupted
  run's own latents; the clean activation is written at every chosen position at once.
- iterative: the latent loop is re-run step by step on the corrupted prompt; at the step that
  computes a chosen position the clean activation is written there, and the patched final state is
  projected into the next latent, so later latents are regenerated. The patch is written once, at
  its own step: earlier positions are never re-patched, they are simply in the KV cache.

Both end with one teacher-forced pass over [question, bot, latents, eot, prefix, answer...] with the
same sites patched. For iterative this pass reproduces the loop exactly (a position's activations
depend only on earlier positions and on the fed inputs), and it yields the patched run's cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from interp.model import CodiModel, Generation, Hook, Trace, extract_answer

Strategy = Literal["parallel", "iterative"]
STRATEGIES: tuple[Strategy, ...] = ("parallel", "iterative")
HEAD_HOOKS = ("hook_z", "hook_q", "hook_k", "hook_v", "hook_result")
#: hooks whose second axis is not the chunk's positions (patterns, keys after the KV cache join)
UNPATCHABLE = ("hook_pattern", "hook_attn_scores", "hook_rot_k")


class PatchError(ValueError):
    """A patch that cannot be run as asked (unknown hook, out-of-range position, misaligned traces)."""


@dataclass(frozen=True)
class Site:
    """Where a clean activation is written: a hook name, absolute positions, optionally one head."""

    hook: str
    positions: tuple[int, ...]
    head: int | None = None


@dataclass
class PatchResult:
    """The corrupted run with clean activations patched in.

    answer_logits [d_vocab] at the trace's answer position; next_logits [d_vocab] at the last
    teacher-forced position (the first differing answer token when the traces carry the answers'
    common prefix); latents [K, d_model] what was fed; cache: the patched run's activations;
    answer: greedy decode from eot after the patch (the official answer rule).
    """

    answer_logits: Tensor
    next_logits: Tensor
    latents: Tensor
    cache: ActivationCache | None
    generation: Generation

    @property
    def answer(self) -> float | None:
        return self.generation.answer


def layer_of(hook: str) -> int | None:
    """`blocks.3.hook_resid_post` -> 3; hooks outside the blocks -> None."""
    parts = hook.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None


def check_hook(model: CodiModel, hook: str, head: int | None = None) -> None:
    """Raise a clear error for an unknown hook name or an out-of-range head."""
    if hook not in model.model.hook_dict:
        layer = layer_of(hook)
        if layer is not None and not 0 <= layer < model.cfg.n_layers:
            raise PatchError(f"layer {layer} out of range in {hook!r}: the model has layers 0..{model.cfg.n_layers - 1}")
        suffix = hook.split(".")[-1]
        similar = sorted(n for n in model.model.hook_dict if n.endswith(suffix))[:4] or sorted(model.model.hook_dict)[:4]
        raise PatchError(f"unknown hook {hook!r}; TransformerLens names look like {', '.join(similar)}")
    if hook.endswith(UNPATCHABLE):
        raise PatchError(f"{hook!r} is not indexed by position on its second axis; patch hook_z, hook_q/k/v or a residual hook")
    if head is not None:
        if not hook.endswith(HEAD_HOOKS):
            raise PatchError(f"a head index needs a per-head hook ({', '.join(HEAD_HOOKS)}), not {hook!r}")
        n_heads = model.cfg.n_key_value_heads if hook.endswith(("hook_k", "hook_v")) else model.cfg.n_heads
        if not 0 <= head < n_heads:
            raise PatchError(f"head {head} out of range for {hook!r}: heads are 0..{n_heads - 1}")


def check_aligned(corrupted: Trace, clean: Trace) -> None:
    """Both traces must share their layout: same length, latent and answer positions."""
    if corrupted.seq_len != clean.seq_len:
        raise PatchError(
            f"traces of different lengths (corrupted {corrupted.seq_len}, clean {clean.seq_len} positions): "
            "patching needs prompts that tokenize to the same length; filter pairs with interp.data.align"
        )
    if corrupted.latent_positions != clean.latent_positions or corrupted.answer_position != clean.answer_position:
        raise PatchError("traces place their latents or answer at different positions; they cannot be patched into each other")


def latent_sites(trace: Trace, hook: str, latents: Sequence[int], head: int | None = None) -> Site:
    """A site at the positions of latent indices `latents` (0-based) of `trace`."""
    k = len(trace.latent_positions)
    bad = [t for t in latents if not 0 <= t < k]
    if bad:
        raise PatchError(f"latent index {bad[0]} out of range: latents are 0..{k - 1}")
    return Site(hook, tuple(trace.latent_positions[t] for t in latents), head)


def _write(source: Tensor, positions: list[int], chunk_positions: list[int], head: int | None):
    """A hook that writes source[:, positions] into the chunk at chunk_positions."""

    def hook_fn(act: Tensor, hook) -> Tensor:
        # A copy, never an in-place write: at blocks.0.hook_resid_pre the activation IS the caller's
        # input embeddings (start_at_layer=0), and writing into it would alter the trace itself.
        act = act.clone()
        value = source[:, positions].to(act)
        if head is None:
            act[:, chunk_positions] = value
        else:
            act[:, chunk_positions, head] = value[:, :, head]
        return act

    return hook_fn


def site_hooks(sites: Sequence[Site], clean: Trace, start: int, length: int) -> list[Hook]:
    """Hooks for the chunk of absolute positions [start, start + length) of the patched run."""
    hooks = []
    for site in sites:
        inside = [p for p in site.positions if start <= p < start + length]
        if inside:
            source = clean.cache[site.hook]
            hooks.append((site.hook, _write(source, inside, [p - start for p in inside], site.head)))
    return hooks


def run_patched(model: CodiModel, corrupted: Trace, clean: Trace, sites: Sequence[Site], strategy: Strategy, *, with_cache: bool = True, decode: bool = True, max_new_tokens: int = 16) -> PatchResult:
    """Run the corrupted trace with clean activations written at `sites`, by `strategy`."""
    if strategy not in STRATEGIES:
        raise PatchError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    check_aligned(corrupted, clean)
    for site in sites:
        check_hook(model, site.hook, site.head)
        out_of_range = [p for p in site.positions if not 0 <= p < corrupted.seq_len]
        if out_of_range:
            raise PatchError(f"position {out_of_range[0]} out of range: the sequence has positions 0..{corrupted.seq_len - 1}")

    def chunk_hooks(start: int, length: int) -> list[Hook]:
        return site_hooks(sites, clean, start, length)

    n_prompt = corrupted.latent_positions[0]  # question + bot
    with torch.no_grad():
        if strategy == "parallel":
            latents = corrupted.latents
        else:
            latents = model.run_latents(corrupted.input_embeds[None, :n_prompt], chunk_hooks=chunk_hooks)[0][0]
        embeds = corrupted.input_embeds.clone()
        embeds[corrupted.latent_positions] = latents.to(embeds)
        out = model.forward(embeds[None], fwd_hooks=chunk_hooks(0, corrupted.seq_len), with_cache=with_cache)
        generation = _decode(model, corrupted, embeds, chunk_hooks, latents, max_new_tokens) if decode else None
    return PatchResult(
        answer_logits=out.logits[0, corrupted.answer_position],
        next_logits=out.logits[0, -1],
        latents=latents,
        cache=out.cache,
        generation=generation,
    )


def _decode(model: CodiModel, trace: Trace, embeds: Tensor, chunk_hooks, latents: Tensor, max_new_tokens: int) -> Generation:
    """Greedy decode from eot of the patched run; sites after eot (teacher-forced only) do not apply."""
    eot = trace.position("eot")
    kv_cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.device, 1)
    model.forward(embeds[None, :eot], kv_cache=kv_cache, fwd_hooks=chunk_hooks(0, eot))
    ids = model.greedy_decode(embeds[None, eot : eot + 1], kv_cache, max_new_tokens=max_new_tokens, fwd_hooks=chunk_hooks(eot, 1))[0]
    text = model.tokenizer.decode(ids, skip_special_tokens=True)
    return Generation(trace.generation.question_ids, latents.cpu(), ids, text, extract_answer(text))


def patch(
    model: CodiModel,
    corrupted: Trace,
    clean: Trace,
    hook: str,
    latents: Sequence[int],
    strategy: Strategy,
    *,
    head: int | None = None,
    with_cache: bool = True,
) -> PatchResult:
    """Patch the clean activation at `hook` into the corrupted run at latent indices `latents`.

    `hook` is any TransformerLens hook name (`blocks.{L}.hook_resid_post`, `blocks.{L}.attn.hook_z`
    with `head`, ...); `latents` are 0-based latent indices; `strategy` is "parallel" or
    "iterative" (see the module docstring).
    """
    return run_patched(model, corrupted, clean, [latent_sites(corrupted, hook, latents, head)], strategy, with_cache=with_cache)
