"""An independent CODI implementation in plain `transformers` + `peft` for the tests.

It shares no code with `interp/`: LoRA stays unmerged (peft computes it, Conv1D included), there
is no KV cache (every step recomputes the whole sequence, so HF assigns positions 0..n-1 as the
official batch-1 run does), and activations are read with PyTorch forward hooks on the HF decoder
layers (LlamaForCausalLM `model.layers`, GPT2LMHeadModel `transformer.h`). Slow and obviously
correct is the point. `remove_eos=False` is the official code's default: [eos, bot] after the
question and [eot, eos] before decoding.

`ReferenceCoconut` is the same for Coconut (facebookresearch/coconut): its `forward_ids` is the
official multi-pass KV-cache loop, and `reference_coconut_patch` recomputes everything instead.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn
from transformers import GPT2LMHeadModel


class HFLayers:
    """The decoder layers of a reference's HF causal LM (`hf_model`), for forward hooks."""

    hf_model: nn.Module

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


class ReferenceCodi(HFLayers, nn.Module):
    """The state_dict of this module is an official CODI checkpoint: keys `codi.*` and `prj.*`."""

    def __init__(self, codi: nn.Module, prj: nn.Module):
        super().__init__()
        self.codi = codi
        self.prj = prj

    @property
    def hf_model(self):
        """The HF causal LM inside (peft-wrapped or not); used for its layers and embeddings."""
        return self.codi.get_base_model() if hasattr(self.codi, "get_base_model") else self.codi

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


def _full_pass(ref: ReferenceCodi | ReferenceCoconut, embeds: torch.Tensor):
    """One full pass over embeds [1, pos, d], no KV cache: `ref.codi` for CODI (as before), the
    Coconut base with explicit positions 0..pos-1 for Coconut."""
    return ref.full(embeds) if isinstance(ref, ReferenceCoconut) else ref.codi(inputs_embeds=embeds)


@torch.no_grad()
def module_outputs(ref: ReferenceCodi | ReferenceCoconut, embeds: torch.Tensor, module: str, layer: int) -> torch.Tensor:
    """Output [seq, d] of decoder layer `layer` ("layer"), its attention ("attn") or mlp ("mlp")."""
    target = ref.module(module, layer)
    got = []
    handle = target.register_forward_hook(lambda m, a, out: got.append((out[0] if isinstance(out, tuple) else out)[0].clone()))
    try:
        _full_pass(ref, embeds)
    finally:
        handle.remove()
    return got[0]


# ---------------------------------------------------------------------------------------------
# Coconut (Hao et al. 2024; facebookresearch/coconut @ 27273cb, coconut.py / dataset.py / run.py)
# ---------------------------------------------------------------------------------------------

#: the official markers, in the order run.py adds them (GPT-2: ids 50257, 50258, 50259)
COCONUT_MARKERS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


def _cache_kwarg(model: nn.Module) -> str:
    """The name of the KV-cache argument and output field: `cache` in transformers >= 5.2x (where
    `past_key_values` is a deprecated alias, to be removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ReferenceCoconut(HFLayers, nn.Module):
    """The official `Coconut` module, batch 1, inference only. Its state_dict is an official
    checkpoint: `base_causallm.*` plus `embedding.weight`, the base's input embedding module
    registered a second time (GPT-2: `base_causallm.transformer.get_input_embeddings()`, otherwise
    `base_causallm.get_input_embeddings()`, as coconut.py does). No projection: the thought fed at a
    latent position p is `hidden_states[-1][p - 1]`, the final-normed last-layer state of the
    previous position, fed as `inputs_embeds` at p (GPT-2 adds `wpe[p]` to it as to any input
    embedding)."""

    def __init__(self, base_causallm: nn.Module, latent_id: int, start_id: int, end_id: int, eos_id: int):
        super().__init__()
        self.base_causallm = base_causallm
        self.latent_id, self.start_id, self.end_id, self.eos_id = latent_id, start_id, end_id, eos_id
        if isinstance(base_causallm, GPT2LMHeadModel):
            self.embedding = base_causallm.transformer.get_input_embeddings()
        else:
            self.embedding = base_causallm.get_input_embeddings()

    @property
    def hf_model(self) -> nn.Module:
        return self.base_causallm

    @property
    def final_norm(self) -> nn.Module:
        """GPT-2 `transformer.ln_f` (weight and bias), LLaMA `model.norm` (RMSNorm)."""
        hf = self.base_causallm
        return hf.model.norm if hasattr(hf, "model") else hf.transformer.ln_f

    def prompt_ids(self, tokenizer, question: str, k: int) -> list[int]:
        """`get_question_latent_dataset`: question + "\\n" (special tokens added: Llama's BOS,
        nothing on GPT-2), <|start-latent|>, <|latent|> x k, <|end-latent|>."""
        return tokenizer.encode(question + "\n", add_special_tokens=True) + [self.start_id] + [self.latent_id] * k + [self.end_id]

    def latent_positions(self, ids: list[int]) -> list[int]:
        return [i for i, t in enumerate(ids) if t == self.latent_id]

    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        """Token embeddings [1, n, d] (`self.embedding`, no position embedding)."""
        return self.embedding(torch.tensor([list(ids)]))

    @torch.no_grad()
    def sequence_embeds(self, ids: list[int], thoughts: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [1, n, d] of ids with thoughts [k, d] written at the k latent positions."""
        embeds = self.embed(ids)
        positions = self.latent_positions(ids)
        assert len(positions) == thoughts.shape[0], (len(positions), tuple(thoughts.shape))
        if positions:
            embeds[0, positions] = thoughts.to(embeds)
        return embeds

    @torch.no_grad()
    def full(self, embeds: torch.Tensor, **kwargs):
        """One full pass over embeds [1, n, d], no KV cache, positions 0..n-1 as `generate` gives."""
        n = embeds.shape[1]
        return self.base_causallm(inputs_embeds=embeds, position_ids=torch.arange(n)[None], use_cache=False, output_hidden_states=True, **kwargs)

    @torch.no_grad()
    def forward_ids(self, input_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`Coconut.forward` for one sequence: returns (inputs_embeds [1, n, d] with the thoughts
        written in, logits [1, n, V] concatenated over the passes).

        k latents -> k + 1 passes over the HF KV cache: pass 0 runs [0, first latent); each later
        pass runs the one position just filled; the last pass runs from the last latent to the end.
        After pass i the latent i is filled with hidden_states[-1] at the position before it.
        Positions are explicit (arange(n), as `Coconut.generate` passes them), the attention mask is
        all ones over past + current positions as in the official code.

        transformers 5 note: the official code rebuilds the cache as a list of (k[:, :, :start],
        v[:, :, :start]) tuples, which transformers 5 no longer accepts (AttributeError: 'list' has no
        `get_query_offset`). Here the returned `DynamicCache` is cropped in place to `start`
        positions; in 5.2x `DynamicCache.crop(m)` takes m <= 0 (remove -m tokens; a positive m raises
        ValueError), so the call is `crop(start - cache.get_seq_length())`. The official slice is
        always a no-op in practice (the cache holds exactly `start` positions), and so is this crop.
        """
        ids = torch.tensor([list(input_ids)])
        n = ids.shape[1]
        latent = self.latent_positions(list(input_ids))
        position_ids = torch.arange(n)[None]
        inputs_embeds = self.embedding(ids)
        cache_kw = _cache_kwarg(self.base_causallm)
        compute = (0, latent[0] if latent else n)
        cache = None
        logits = []

        def run_pass(start: int, end: int):
            """Positions [start, end) over the cache cropped to `start` positions (a no-op in practice)."""
            if cache is not None and cache.get_seq_length() > start:
                cache.crop(start - cache.get_seq_length())
            return self.base_causallm(
                inputs_embeds=inputs_embeds[:, start:end],
                attention_mask=torch.ones(1, end, dtype=torch.long),
                position_ids=position_ids[:, start:end],
                output_hidden_states=True,
                **({cache_kw: cache} if cache is not None else {}),
            )

        for pass_idx in range(len(latent)):
            start, end = compute
            out = run_pass(start, end)
            offset = 0 if cache is None else start
            logits.append(out.logits)
            cache = getattr(out, cache_kw)
            assert cache.get_seq_length() == end, (cache.get_seq_length(), end)
            hidden = out.hidden_states[-1]
            compute = (end, n if pass_idx + 1 >= len(latent) else end + 1)
            p = latent[pass_idx]
            inputs_embeds = inputs_embeds.clone()  # the official code rebuilds it (no in-place op)
            inputs_embeds[0, p] = hidden[0, p - 1 - offset]
        logits.append(run_pass(*compute).logits)
        return inputs_embeds, torch.cat(logits, dim=-2)

    @torch.no_grad()
    def generate_ids(self, input_ids: list[int], max_new_tokens: int) -> tuple[torch.Tensor, list[int]]:
        """`Coconut.generate`, batch 1. Returns (thoughts [k, d] fed at the latent positions, the
        generated tokens after the prompt).

        As the official code: one `forward_ids` over the prompt; its last argmax is appended
        unconditionally, *even if it is eos* (and decoding goes on past it); then up to
        max_new_tokens - 1 greedy steps, each re-running the whole sequence of input embeddings
        (prompt embeddings with the thoughts, then the generated tokens' embeddings) with no KV cache
        and no position_ids (HF's default 0..n-1), argmax over the full vocabulary (markers
        included); a step that picks eos stops and eos is not appended. So len <= max_new_tokens,
        and the list never ends with eos unless it is the single first token. The official answer
        is `coconut_answer(tokenizer, input_ids + generated)`."""
        inputs_embeds, logits = self.forward_ids(input_ids)
        thoughts = inputs_embeds[0, self.latent_positions(list(input_ids))]
        token = int(torch.argmax(logits[0, -1]))
        generated = [token]
        embeds = torch.cat([inputs_embeds, self.embed([token])], dim=1)
        for _ in range(max_new_tokens - 1):
            token = int(torch.argmax(self.base_causallm(inputs_embeds=embeds).logits[0, -1]))
            if token == self.eos_id:
                break
            generated.append(token)
            embeds = torch.cat([embeds, self.embed([token])], dim=1)
        return thoughts, generated

    @torch.no_grad()
    def layer_outputs(self, embeds: torch.Tensor) -> list[torch.Tensor]:
        """Each decoder layer's output [pos, d] for a full pass over embeds [1, pos, d]."""
        outputs: list[torch.Tensor] = []
        handles = [layer.register_forward_hook(lambda mod, args, out: outputs.append((out[0] if isinstance(out, tuple) else out)[0].clone())) for layer in self.blocks]
        try:
            self.full(embeds)
        finally:
            for h in handles:
                h.remove()
        return outputs


def coconut_answer(tokenizer, tokens: list[int]) -> str:
    """run.py's answer: decode prompt + generated with skip_special_tokens=True (eos goes; the added
    markers are not special and stay), the text after the last "#", commas removed, stripped."""
    return tokenizer.decode(tokens, skip_special_tokens=True).split("#")[-1].replace(",", "").strip()


@torch.no_grad()
def reference_coconut_patch(
    ref: ReferenceCoconut,
    corrupted_ids: list[int],
    corrupted_thoughts: torch.Tensor,
    clean_outputs: torch.Tensor,
    tail_ids: list[int],
    *,
    module: str,
    layer: int,
    positions: list[int],
    strategy: str,
):
    """Patch clean outputs of decoder layer `layer` (module "layer") or its attention / mlp into the
    corrupted Coconut run at `positions` (sequence positions), full recompute, no KV cache.

    corrupted_ids: the prompt through <|end-latent|> (`prompt_ids`); tail_ids: the tokens after it
    (e.g. "###"); corrupted_thoughts [k, d]: the corrupted run's fed thoughts; clean_outputs
    [seq, d]: the clean run's output of that module over its full sequence (`module_outputs`).
    The thought map is the identity: thought at p = hidden_states[-1][p - 1].
    parallel: one pass with the thoughts held at the corrupted run's, the patch written at
    `positions`; iterative: the latent loop re-run position by position with the patch active in
    every pass and in the final one; feedback: the loop re-run with the patch only in the pass whose
    last position is the patched one (its state feeds the next thought), the final pass unpatched.
    Returns (logits at the last position [V], thoughts fed [k, d]).
    """
    ids = list(corrupted_ids) + list(tail_ids)
    latent = ref.latent_positions(list(corrupted_ids))
    assert len(latent) == corrupted_thoughts.shape[0], (len(latent), tuple(corrupted_thoughts.shape))
    assert strategy in ("parallel", "iterative", "feedback"), strategy
    target = ref.module(module, layer)
    values = clean_outputs[positions]
    if strategy == "parallel":
        embeds = ref.sequence_embeds(ids, corrupted_thoughts)
        handle = _replace_output(target, positions, values)
        try:
            logits = ref.full(embeds).logits[0, -1]
        finally:
            handle.remove()
        return logits, embeds[0, latent]
    embeds = ref.embed(ids)
    if strategy == "feedback":
        for p in latent:
            here = p - 1  # the last position of this pass: its final-normed state is the thought at p
            handle = _replace_output(target, [here], values[[positions.index(here)]]) if here in positions else None
            try:
                embeds[0, p] = ref.full(embeds[:, :p]).hidden_states[-1][0, p - 1]
            finally:
                if handle is not None:
                    handle.remove()
        return ref.full(embeds).logits[0, -1], embeds[0, latent]
    handle = _replace_output(target, positions, values)
    try:
        for p in latent:
            embeds[0, p] = ref.full(embeds[:, :p]).hidden_states[-1][0, p - 1]
        logits = ref.full(embeds).logits[0, -1]
    finally:
        handle.remove()
    return logits, embeds[0, latent]
