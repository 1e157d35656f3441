"""The naive patcher: a short readable specification of the three strategies, and a baseline.

Every step is a full forward pass over the whole sequence so far, without a KV cache, with the
intervention written by a plain hook. Slow and obviously correct: the tests compare the engine
(`interp.engine`) against it, and `python -m benchmarks.bench` times the engine against it.

- parallel: fed latents held at the corrupted run's; one pass with every site written.
- iterative: latent t+1 = prj(final state at latent t) of a full pass over [prompt, latents <= t]
  with every site written.
- feedback: latent t+1 = prj(final state at latent t) of a full pass over [prompt, latents <= t]
  with only the sites at position t written; every other pass (the ones later positions are
  computed in) writes nothing.
Then a full pass over the teacher-forced sequence (with the sites written, except for feedback)
and a greedy decode that recomputes the whole sequence for every token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformer_lens import ActivationCache

from interp.engine import PatchResult, Site
from interp.interventions import Add, Clean, Custom, Intervention, Mean, Zero
from interp.layout import MAX_NEW_TOKENS
from interp.model import Generation, LatentModel, Trace


def written(intervention: Intervention, act: Tensor, clean: Trace, hook: str, position: int, head: int | None) -> Tensor:
    """What `intervention` writes over `act` (one position's activation, [*site_shape]), spelled out
    here from each intervention's definition rather than through its own `source`/`apply` code."""
    index = (0, position) if head is None else (0, position, head)
    if isinstance(intervention, Clean):
        return clean.cache[hook][index].to(act)
    if isinstance(intervention, Zero):
        return torch.zeros_like(act)
    if isinstance(intervention, Add):
        return act + intervention.scale * intervention.vector.to(act)
    if isinstance(intervention, Mean):  # the mean over the traces at the same named position
        name = clean.layout.name(position)
        values = [t.cache[hook][0, t.layout.position(name)].double() for t in intervention.traces]
        mean = sum(values) / len(values)
        return (mean if head is None else mean[head]).to(act)
    if isinstance(intervention, Custom):
        return intervention.fn(act[None], clean.cache[hook][index].to(act)[None])[0]
    raise TypeError(f"the naive specification does not know {type(intervention).__name__}")


def site_hooks(sites: Sequence[Site], clean: Trace, intervention: Intervention, only: int | None = None) -> list:
    """Hooks writing `intervention` at every site position (or only at position `only`) of a full pass."""
    hooks = []
    for site in sites:
        positions = [p for p in site.positions if only is None or p == only]
        if not positions:
            continue

        def write(act: Tensor, hook, positions=positions, site=site) -> Tensor:
            act = act.clone()
            for p in positions:
                if p < act.shape[1]:
                    index = (0, p) if site.head is None else (0, p, site.head)
                    act[index] = written(intervention, act[index], clean, site.hook, p, site.head)
            return act

        hooks.append((site.hook, write))
    return hooks


@torch.no_grad()
def naive_patch(
    model: LatentModel,
    corrupted: Trace,
    clean: Trace,
    sites: Sequence[Site],
    strategy: str,
    *,
    intervention: Intervention | None = None,
    family: str | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> PatchResult:
    """One patched run the naive way (see the module docstring); `family` captures that hook family."""
    intervention = intervention or Clean()
    layout = corrupted.layout
    buf = corrupted.input_embeds.clone()[None]  # [1, seq, d]: the fed inputs
    everywhere = site_hooks(sites, clean, intervention)
    if strategy in ("iterative", "feedback"):
        for t in range(layout.num_latents - 1):
            pos = layout.latent(t)
            hooks = everywhere if strategy == "iterative" else site_hooks(sites, clean, intervention, only=pos)
            out = model.forward(buf[:, : pos + 1], fwd_hooks=hooks, logit_positions=[], thoughts=True)
            buf[0, pos + 1] = out.thoughts[0, -1].to(buf)
    elif strategy != "parallel":
        raise ValueError(f"unknown strategy {strategy!r}")
    final_hooks = [] if strategy == "feedback" else everywhere
    captured: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> None:
        captured[hook.name] = act.clone()

    names = [f"blocks.{layer}.{family}" for layer in range(model.cfg.n_layers)] if family else []
    out = model.forward(buf, fwd_hooks=final_hooks + [(n, grab) for n in names])
    latents = buf[0, layout.latent_positions].clone().cpu()
    ids: list[int] = []
    decode_from = layout.decode_start + 1
    for _ in range(max_new_tokens):
        x = torch.cat([buf[:, :decode_from], model.embed(torch.tensor([ids], dtype=torch.long))], dim=1) if ids else buf[:, :decode_from]
        ids.append(int(model.forward(x, fwd_hooks=final_hooks, logit_positions=[x.shape[1] - 1]).logits[0, -1, : model.decode_vocab].argmax()))
        if ids[-1] == model.eos_id:
            break
    answer = torch.tensor(ids, dtype=torch.long)
    text = model.tokenizer.decode(answer, skip_special_tokens=True)
    generation = Generation(corrupted.generation.question_ids, latents, answer, text, model.extract_answer(text))
    return PatchResult(
        answer_logits=out.logits[0, layout.answer_position],
        next_logits=out.logits[0, -1],
        latents=latents,
        cache=ActivationCache(captured, model.model) if names else None,
        generation=generation,
    )
