"""Peer baselines for `python -m benchmarks.bench`: the same patch tests written without `interp`.

`nnsight_patch` is how a researcher who does not use `interp` would patch CODI with nnsight
(https://nnsight.net, 0.8 API) on the plain transformers + peft model:

- the model is the HF causal LM (LLaMA family or GPT-2) wrapped in peft (LoRA unmerged) plus the
  projection `prj`;
  `NnsightCodi` wraps it in `nnsight.NNsight` and runs every forward pass as `model.trace(...)`;
- the latent loop runs with an HF `DynamicCache`, as `generate` does: one pass over
  [question, bot], then one pass per latent, each latent = prj(final-normed state at the last
  position, read from `norm.output`), then one pass over [eot, teacher-forced tail];
- a patch writes the clean run's output of decoder layer L (`model.layers[L]`, GPT-2 `transformer.h[L]`;
  TransformerLens `blocks.L.hook_resid_post`) at the chosen latent positions: `layers[L].output[0, i] = clean`;
- strategies: "parallel" holds the latent inputs at the corrupted run's latents and patches all
  positions in one pass over the whole sequence; "iterative" re-runs the latent loop on the corrupted
  prompt, patching latent t's position at step t, so later latents are regenerated from the patched
  state (each position is patched once: in the pass that computes it; later passes read it from the cache);
- the result is the logits at the last position of the teacher-forced tail (the answer token), the
  fed latents and a greedy decode (logits restricted to ids < eot, as the official code does) that
  continues from eot on the patched cache.

Sequence positions (0-based): question ids (with BOS) at 0..q-1, bot at q, latent t at q + 1 + t,
eot at q + 1 + K, the tail after it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from nnsight import NNsight
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from interp.layout import MAX_NEW_TOKENS  # the engine's decode bound: the same tests decode as far

STRATEGIES = ("parallel", "iterative")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")


@dataclass
class CodiRun:
    """One run of the CODI loop (patched or not).

    latents [K, d]: the latent inputs fed; logits [vocab]: at the last position of the teacher-forced
    tail; answer_ids: the greedy decode after eot (up to and including eos); layer_outputs
    [n_layers, seq, d]: every decoder layer's output at every position (unpatched runs only).
    """

    latents: Tensor
    logits: Tensor
    answer_ids: list[int]
    layer_outputs: Tensor | None = None


def hf_codi(state: Mapping[str, Tensor], base: PreTrainedModel, *, lora_alpha: float = 32.0) -> tuple[nn.Module, nn.Sequential]:
    """The (HF model, prj) of an official CODI state_dict (`codi.*` and `prj.*` keys) on an HF base.

    The base is copied and its vocabulary grown to the checkpoint's (V + 3: pad, bot, eot). With LoRA
    keys the model is wrapped in peft (rank and targets read from the `lora_A` keys; `lora_alpha` is not
    stored in checkpoints, the released scripts use 32); without, the weights load into the plain model.
    Loading is strict: a missing, unused or mis-shaped key raises (a tied `lm_head` may be absent).
    """
    codi_state = {k.removeprefix("codi."): v for k, v in state.items() if k.startswith("codi.")}
    prj_state = {k.removeprefix("prj."): v for k, v in state.items() if k.startswith("prj.")}
    unknown = sorted(k for k in state if not k.startswith(("codi.", "prj.")))
    if unknown or not prj_state:
        raise ValueError(f"expected codi.* and prj.* keys only (a CODI checkpoint); unknown {unknown[:5]}, prj keys {sorted(prj_state)}")
    model = copy.deepcopy(base)
    embed_key = next((k for k in codi_state if k.endswith(("embed_tokens.weight", "wte.weight"))), None)
    if embed_key is None:
        raise ValueError("no input embedding (embed_tokens.weight or wte.weight) in the checkpoint; expected a LLaMA or GPT-2 CODI checkpoint")
    model.resize_token_embeddings(codi_state[embed_key].shape[0], mean_resizing=False)
    lora_a = {k: v for k, v in codi_state.items() if k.endswith("lora_A.default.weight")}
    if lora_a:
        from peft import LoraConfig, get_peft_model

        ranks = {v.shape[0] for v in lora_a.values()}
        if len(ranks) != 1:
            raise ValueError(f"LoRA ranks differ across modules: {sorted(ranks)}")
        targets = sorted({k.split(".")[-4] for k in lora_a})
        conv1d = model.config.model_type == "gpt2"  # GPT-2's Conv1D stores [in, out]: peft needs fan_in_fan_out
        lora = LoraConfig(r=ranks.pop(), lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=conv1d)
        model = get_peft_model(model, lora)
    missing, unexpected = model.load_state_dict(codi_state, strict=False)
    tied = model.config.tie_word_embeddings
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unused {unexpected[:5]}")
    hidden, d = prj_state["1.weight"].shape
    prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
    if "ln.weight" in prj_state:
        prj.add_module("ln", nn.LayerNorm(d))
    prj.load_state_dict(prj_state, strict=True)
    return model.eval(), prj.to(model.dtype).eval()


class NnsightCodi:
    """A CODI model (HF causal LM, peft-wrapped or merged, + prj) under nnsight.

    bot_id / eot_id / eos_id: the special tokens (bot = V+1, eot = V+2 for a base vocabulary V).
    """

    def __init__(self, codi: nn.Module, prj: nn.Module, *, bot_id: int, eot_id: int, eos_id: int | None, num_latents: int = 6):
        self.hf = codi.get_base_model() if hasattr(codi, "get_base_model") else codi
        self.prj = prj
        self.model = NNsight(codi)
        gpt2 = self.hf.config.model_type == "gpt2"
        root = self.model.base_model.model if self.hf is not codi else self.model  # the HF model's envoy
        decoder = root.transformer if gpt2 else root.model
        self.layers, self.norm = (decoder.h, decoder.ln_f) if gpt2 else (decoder.layers, decoder.norm)
        self.n_layers = self.hf.config.num_hidden_layers
        self.bot_id, self.eot_id, self.eos_id, self.num_latents = bot_id, eot_id, eos_id, num_latents

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Tensor], base: PreTrainedModel, tokenizer: Any, *, lora_alpha: float = 32.0, num_latents: int = 6) -> NnsightCodi:
        """From a CODI state_dict on an HF base of vocabulary V: bot = V + 1, eot = V + 2, eos = the tokenizer's."""
        model, prj = hf_codi(state, base, lora_alpha=lora_alpha)
        v = base.get_input_embeddings().weight.shape[0]
        return cls(model, prj, bot_id=v + 1, eot_id=v + 2, eos_id=tokenizer.eos_token_id, num_latents=num_latents)

    @property
    def device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    def embed(self, ids: Sequence[int]) -> Tensor:
        """Input embeddings [1, len(ids), d]."""
        return self.hf.get_input_embeddings()(torch.tensor([list(ids)], device=self.device))

    def _pass(
        self, embeds: Tensor, cache: DynamicCache, *, patch: tuple[int, list[int], Tensor] | None = None, save_layers: bool = False, logit_positions: Sequence[int] = (-1,)
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """One traced pass over embeds [1, n, d] after the cached positions.

        patch: (layer, chunk-relative positions, values [len, d]) written into that layer's output.
        Returns (final-normed state at the last position [d], logits at logit_positions [len, vocab],
        each layer's output [n, d] if save_layers else []).
        """
        positions = list(logit_positions)
        with self.model.trace(inputs_embeds=embeds, cache=cache, use_cache=True):
            outputs = [].save()
            for i, layer in enumerate(self.layers):
                if patch is not None and i == patch[0]:
                    layer.output[0, patch[1]] = patch[2]
                if save_layers:
                    outputs.append(layer.output[0].clone())
            final = self.norm.output[0, -1].save()
            logits = self.model.output.logits[0, positions].save()
        return final, logits, outputs

    def _decode(self, first_logits: Tensor, cache: DynamicCache, max_new_tokens: int) -> list[int]:
        """Greedy decode from the logits at eot, on a cache that ends at eot (ids < eot only)."""
        ids: list[int] = []
        logits = first_logits
        for _ in range(max_new_tokens):
            ids.append(int(logits[: self.eot_id].argmax()))
            if ids[-1] == self.eos_id or len(ids) == max_new_tokens:
                break
            logits = self.hf(inputs_embeds=self.embed(ids[-1:]), cache=cache, use_cache=True).logits[0, -1]
        return ids

    @torch.no_grad()
    def run(self, question_ids: Sequence[int], tail_ids: Sequence[int], *, max_new_tokens: int = MAX_NEW_TOKENS) -> CodiRun:
        """The unpatched CODI loop with every layer's output saved (the clean or corrupted run)."""
        cache = DynamicCache()
        outputs: list[list[Tensor]] = []
        final, _, outs = self._pass(self.embed([*question_ids, self.bot_id]), cache, save_layers=True)
        outputs.append(outs)
        latents = []
        for _ in range(self.num_latents):
            latents.append(self.prj(final[None])[0])
            final, _, outs = self._pass(latents[-1][None, None], cache, save_layers=True)
            outputs.append(outs)
        _, logits, outs = self._pass(self.embed([self.eot_id, *tail_ids]), cache, save_layers=True, logit_positions=(0, -1))
        outputs.append(outs)
        layer_outputs = torch.stack([torch.cat([chunk[i] for chunk in outputs]) for i in range(self.n_layers)])
        cache.crop(len(question_ids) + 2 + self.num_latents - cache.get_seq_length())  # back to eot (a negative count removes)
        answer = self._decode(logits[0], cache, max_new_tokens)
        return CodiRun(torch.stack(latents), logits[-1], answer, layer_outputs)


@torch.no_grad()
def nnsight_patch(
    codi: NnsightCodi,
    corrupted_ids: Sequence[int],
    corrupted_latents: Tensor,
    clean_outputs: Tensor,
    tail_ids: Sequence[int],
    *,
    layer: int,
    latents: Sequence[int],
    strategy: str,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> CodiRun:
    """Patch the clean output of `model.layers[layer]` into the corrupted run at latent indices `latents`.

    corrupted_latents [K, d]: the corrupted run's fed latents (held fixed by "parallel");
    clean_outputs [seq, d]: the clean run's output of that layer (aligned positions).
    Returns the patched run (latents fed, logits at the last tail position, greedy answer).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    if not 0 <= layer < codi.n_layers:
        raise ValueError(f"layer {layer} out of range: the model has layers 0..{codi.n_layers - 1}")
    k = corrupted_latents.shape[0]
    if any(not 0 <= t < k for t in latents):
        raise ValueError(f"latent indices {list(latents)} out of range 0..{k - 1}")
    first = len(corrupted_ids) + 1  # latent 0's position
    eot = first + k
    cache = DynamicCache()
    tail = codi.embed([codi.eot_id, *tail_ids])
    if strategy == "parallel":
        positions = [first + t for t in latents]
        embeds = torch.cat([codi.embed([*corrupted_ids, codi.bot_id]), corrupted_latents[None].to(tail), tail], dim=1)
        _, logits, _ = codi._pass(embeds, cache, patch=(layer, positions, clean_outputs[positions]), logit_positions=(eot, -1))
        fed = corrupted_latents
    else:
        final, _, _ = codi._pass(codi.embed([*corrupted_ids, codi.bot_id]), cache)
        steps = []
        for t in range(k):
            steps.append(codi.prj(final[None])[0])
            patch = (layer, [0], clean_outputs[[first + t]]) if t in latents else None
            final, _, _ = codi._pass(steps[-1][None, None], cache, patch=patch)
        _, logits, _ = codi._pass(tail, cache, logit_positions=(0, -1))
        fed = torch.stack(steps)
    cache.crop(eot + 1 - cache.get_seq_length())  # back to eot (a negative count removes)
    answer = codi._decode(logits[0], cache, max_new_tokens)
    return CodiRun(fed, logits[-1], answer)
