"""An independent CODI implementation in plain `transformers` + `peft` for the tests.

It shares no code with `interp/`: LoRA stays unmerged (peft computes it, Conv1D included), there
is no KV cache (every step recomputes the whole sequence, so HF assigns positions 0..n-1 as the
official batch-1 run does), and activations are read with PyTorch forward hooks on the HF decoder
layers (LlamaForCausalLM `model.layers`, GPT2LMHeadModel `transformer.h`). Slow and obviously
correct is the point. `remove_eos=False` is the official code's default: [eos, bot] after the
question and [eot, eos] before decoding.
"""

from __future__ import annotations

import re

import torch
from torch import nn


class ReferenceCodi(nn.Module):
    """The state_dict of this module is an official CODI checkpoint: keys `codi.*` and `prj.*`."""

    def __init__(self, codi: nn.Module, prj: nn.Module):
        super().__init__()
        self.codi = codi
        self.prj = prj

    @property
    def hf_model(self):
        """The HF causal LM inside (peft-wrapped or not); used for its layers and embeddings."""
        return self.codi.get_base_model() if hasattr(self.codi, "get_base_model") else self.codi

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers: `model.layers` (LLaMA) or `transformer.h` (GPT-2)."""
        hf = self.hf_model
        return hf.model.layers if hasattr(hf, "model") else hf.transformer.h

    def module(self, kind: str, layer: int) -> nn.Module:
        """Decoder layer `layer` ("layer"), its attention ("attn") or its MLP ("mlp")."""
        block = self.blocks[layer]
        attn = block.self_attn if hasattr(block, "self_attn") else block.attn
        return {"layer": block, "attn": attn, "mlp": block.mlp}[kind]

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.hf_model.get_input_embeddings()(torch.tensor([ids]))

    def final_state(self, embeds: torch.Tensor) -> torch.Tensor:
        """hidden_states[-1] (after the final norm) at the last position, full recompute."""
        out = self.codi(inputs_embeds=embeds, output_hidden_states=True)
        return out.hidden_states[-1][:, -1]

    @torch.no_grad()
    def generate(self, question_ids: list[int], *, bot: int, eot: int, eos: int, num_latents: int, max_new_tokens: int, remove_eos: bool = True):
        """The official loop. Returns (latents [K, d], answer ids up to and including eos)."""
        embeds = self.embed(question_ids + ([] if remove_eos else [eos]) + [bot])
        latents = []
        for _ in range(num_latents):
            latent = self.prj(self.final_state(embeds))[:, None]
            latents.append(latent[0, 0])
            embeds = torch.cat([embeds, latent], dim=1)
        embeds = torch.cat([embeds, self.embed([eot] + ([] if remove_eos else [eos]))], dim=1)
        answer = []
        for _ in range(max_new_tokens):
            logits = self.codi(inputs_embeds=embeds).logits[0, -1, :eot]
            token = int(logits.argmax())
            answer.append(token)
            if token == eos:
                break
            embeds = torch.cat([embeds, self.embed([token])], dim=1)
        return torch.stack(latents), answer

    @torch.no_grad()
    def layer_outputs(self, embeds: torch.Tensor) -> list[torch.Tensor]:
        """Each decoder layer's output [pos, d] for a full pass over embeds [1, pos, d]."""
        outputs: list[torch.Tensor] = []
        handles = [layer.register_forward_hook(lambda mod, args, out: outputs.append((out[0] if isinstance(out, tuple) else out)[0])) for layer in self.blocks]
        try:
            self.codi(inputs_embeds=embeds)
        finally:
            for h in handles:
                h.remove()
        return outputs

    def sequence_embeds(self, question_ids: list[int], latents: torch.Tensor, tail_ids: list[int], *, bot: int, eot: int, eos: int | None = None, remove_eos: bool = True):
        """Embeddings of [question, bot, latents, eot, tail] ([question, eos, bot, ..., eot, eos, tail]
        when remove_eos is False)."""
        extra = [] if remove_eos else [eos]
        return torch.cat([self.embed(question_ids + extra + [bot]), latents[None], self.embed([eot] + extra + tail_ids)], dim=1)


def last_number(text: str) -> float | None:
    found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(found[-1]) if found else None


def _replace_output(module: nn.Module, positions: list[int], values: torch.Tensor):
    """Forward hook on an HF module: overwrite its output at `positions` with values [len, d]."""

    def hook(mod, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        present = [i for i, p in enumerate(positions) if p < hidden.shape[1]]
        if present:
            hidden[0, [positions[i] for i in present]] = values[present].to(hidden)
        return out

    return module.register_forward_hook(hook)


@torch.no_grad()
def reference_patch(
    ref: ReferenceCodi,
    corrupted_ids: list[int],
    corrupted_latents: torch.Tensor,
    clean_layer_outputs: torch.Tensor,
    tail_ids: list[int],
    *,
    module: str,
    layer: int,
    positions: list[int],
    strategy: str,
    bot: int,
    eot: int,
    eos: int | None = None,
    remove_eos: bool = True,
):
    """Patch clean outputs of decoder layer `layer` (module "layer") or its attention / mlp
    into the corrupted run at `positions`, full recompute, no KV cache. parallel: latents held;
    iterative: the loop re-run with the patch in every pass; feedback: the loop re-run, the patch
    only in the pass whose last position is the patched one (that state feeds the projection).

    clean_layer_outputs [seq, d]: the clean run's output of that module. Returns (logits at the
    last position [vocab], latents fed [K, d]).
    """
    target = ref.module(module, layer)
    values = clean_layer_outputs[positions]
    if strategy == "feedback":  # the patch only feeds the projection: no pass that later positions read sees it
        embeds = ref.embed(corrupted_ids + ([] if remove_eos else [eos]) + [bot])
        fed = []
        for _ in range(corrupted_latents.shape[0]):
            here = embeds.shape[1] - 1
            handle = _replace_output(target, [here], values[[positions.index(here)]]) if here in positions else None
            try:
                latent = ref.prj(ref.final_state(embeds))
            finally:
                if handle is not None:
                    handle.remove()
            fed.append(latent[0])
            embeds = torch.cat([embeds, latent[:, None]], dim=1)
        latents = torch.stack(fed)
        embeds = ref.sequence_embeds(corrupted_ids, latents, tail_ids, bot=bot, eot=eot, eos=eos, remove_eos=remove_eos)
        return ref.codi(inputs_embeds=embeds).logits[0, -1], latents
    handle = _replace_output(target, positions, values)
    try:
        if strategy == "parallel":
            latents = corrupted_latents
        else:
            embeds = ref.embed(corrupted_ids + ([] if remove_eos else [eos]) + [bot])
            fed = []
            for _ in range(corrupted_latents.shape[0]):
                latent = ref.prj(ref.final_state(embeds))
                fed.append(latent[0])
                embeds = torch.cat([embeds, latent[:, None]], dim=1)
            latents = torch.stack(fed)
        embeds = ref.sequence_embeds(corrupted_ids, latents, tail_ids, bot=bot, eot=eot, eos=eos, remove_eos=remove_eos)
        logits = ref.codi(inputs_embeds=embeds).logits[0, -1]
    finally:
        handle.remove()
    return logits, latents


def reference_patch_pair(
    ref: ReferenceCodi, model, clean_question: str, corrupted_question: str, clean, corrupted, *, module: str, layer: int, latents: list[int], strategy: str, remove_eos: bool = True
):
    """`reference_patch` for a pair of interp traces: the clean run's `module` output at `layer`,
    recomputed here over [clean question, clean latents, eot, answer prefix], patched into the
    corrupted run at latent indices `latents`. Only ids and fed latents are read from the traces.
    Returns (logits at the last position [vocab], latents fed [K, d])."""
    tok = model.tokenizer
    tail = model.prefix_ids().tolist()
    kw = {"bot": model.bot_id, "eot": model.eot_id, "eos": model.eos_id, "remove_eos": remove_eos}
    clean_out = module_outputs(ref, ref.sequence_embeds(tok(clean_question)["input_ids"], clean.latents, tail, **kw), module, layer)
    positions = [corrupted.latent_positions[t] for t in latents]
    return reference_patch(ref, tok(corrupted_question)["input_ids"], corrupted.latents, clean_out, tail, module=module, layer=layer, positions=positions, strategy=strategy, **kw)


@torch.no_grad()
def module_outputs(ref: ReferenceCodi, embeds: torch.Tensor, module: str, layer: int) -> torch.Tensor:
    """Output [seq, d] of decoder layer `layer` ("layer"), its attention ("attn") or mlp ("mlp")."""
    target = ref.module(module, layer)
    got = []
    handle = target.register_forward_hook(lambda m, a, out: got.append((out[0] if isinstance(out, tuple) else out)[0].clone()))
    try:
        ref.codi(inputs_embeds=embeds)
    finally:
        handle.remove()
    return got[0]
