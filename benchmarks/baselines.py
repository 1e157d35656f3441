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

`nnsight_patch_batched` is the same patch written as nnsight recommends for many interventions: B
tests as the rows of one batch in every traced pass (one input invoke of [B, n, d] embeddings, each
row's patch an indexed write into its layer's output), one `DynamicCache` for the batch, rows of
different lengths left-padded (prefix) and right-padded (tail) with an attention mask, the latent
passes stopped after the final norm, logits computed from eot on only, and a batched greedy decode.
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


# ----------------------------------------------------------------------------- batched


@dataclass
class PatchTest:
    """One row of `nnsight_patch_batched`: the arguments `nnsight_patch` takes for one test.

    corrupted_ids: the corrupted question ids (with BOS); corrupted_latents [K, d]: the corrupted
    run's fed latents; clean_outputs [seq, d]: the clean run's output of decoder layer `layer`
    (the clean run's own positions); tail_ids: the teacher-forced tail after eot; latents: the
    latent indices (0..K-1) patched.
    """

    corrupted_ids: Sequence[int]
    corrupted_latents: Tensor
    clean_outputs: Tensor
    tail_ids: Sequence[int]
    layer: int
    latents: Sequence[int]


#: layer -> (rows [m], chunk columns [m], values [m, d]): the writes one traced pass makes into that layer's output
Patches = dict[int, tuple[Tensor, Tensor, Tensor]]


@dataclass
class _Layout:
    """The columns of a batch of B rows: [question, bot] left-padded to `prefix` columns (so latent t
    sits at column prefix + t and eot at column `eot` in every row), the tail right-padded.

    mask [B, width]: 1 on a row's own tokens, 0 on its padding; position_ids [B, width]: each
    row's own positions (0 at its first token; padding columns get 0 left, continue right);
    n_prefix[b]: row b's question + bot length (its latent 0's position in its own run);
    n_tail[b]: its tail length.
    """

    prefix: int
    eot: int
    width: int
    n_prefix: list[int]
    n_tail: list[int]
    mask: Tensor
    position_ids: Tensor

    @classmethod
    def of(cls, tests: Sequence[PatchTest], k: int, device: torch.device) -> _Layout:
        n_prefix = [len(t.corrupted_ids) + 1 for t in tests]
        n_tail = [len(t.tail_ids) for t in tests]
        prefix = max(n_prefix)
        eot = prefix + k
        width = eot + 1 + max(n_tail)
        cols = torch.arange(width, device=device)
        pads = torch.tensor([prefix - n for n in n_prefix], device=device)[:, None]
        ends = torch.tensor([eot + n for n in n_tail], device=device)[:, None]
        mask = ((cols >= pads) & (cols <= ends)).long()
        return cls(prefix, eot, width, n_prefix, n_tail, mask, (cols - pads).clamp(min=0))


def _padded_embeds(codi: NnsightCodi, chunks: Sequence[Sequence[int]], width: int, *, left: bool) -> Tensor:
    """Input embeddings [B, width, d] of one id chunk per row, zero-padded on the left or the right."""
    emb = codi.hf.get_input_embeddings()
    out = torch.zeros(len(chunks), width, emb.weight.shape[1], dtype=emb.weight.dtype, device=codi.device)
    for b, ids in enumerate(chunks):
        start = width - len(ids) if left else 0
        out[b, start : start + len(ids)] = emb(torch.tensor(list(ids), device=codi.device))
    return out


def _patches(writes: Sequence[tuple[int, int, int, Tensor]], device: torch.device) -> Patches:
    """Group (layer, row, column, value [d]) writes by layer: one indexed assignment per layer and pass."""
    by_layer: dict[int, list[tuple[int, int, Tensor]]] = {}
    for layer, row, col, value in writes:
        by_layer.setdefault(layer, []).append((row, col, value))
    return {
        layer: (torch.tensor([r for r, _, _ in w], device=device), torch.tensor([c for _, c, _ in w], device=device), torch.stack([v for _, _, v in w]).to(device)) for layer, w in by_layer.items()
    }


def _batched_pass(codi: NnsightCodi, embeds: Tensor, cache: DynamicCache, mask: Tensor, position_ids: Tensor, patches: Patches, logits_to_keep: int | None) -> tuple[Tensor, Tensor | None]:
    """One traced pass of B rows, embeds [B, n, d], after the cached columns.

    mask [B, cached + n]: the attention mask of every column so far; position_ids [B, n]; patches:
    written into the layers' outputs (in layer order, as the pass reaches them). logits_to_keep:
    the logits of the last that many columns are computed (HF's `logits_to_keep`) and returned,
    [B, logits_to_keep, vocab]; None: the pass stops after the final norm (`tracer.stop()`: no
    lm_head) and returns None. Returns (the final-normed state at the last column [B, d], logits).
    """
    logits = None
    with codi.model.trace(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep or 1) as tracer:
        for layer in sorted(patches):
            rows, cols, values = patches[layer]
            codi.layers[layer].output[rows, cols] = values
        final = codi.norm.output[:, -1].save()
        if logits_to_keep is None:
            tracer.stop()
        else:
            logits = codi.model.output.logits.save()
    return final, logits


def _batched_decode(codi: NnsightCodi, first_logits: Tensor, cache: DynamicCache, mask: Tensor, next_positions: Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy decode of B rows from their logits at eot [B, vocab], on a cache that ends at eot (ids < eot only).

    mask [B, eot + 1]: the cache's attention mask; next_positions [B]: each row's position of its
    first generated token. All B rows are fed until every row has reached eos or max_new_tokens; a
    finished row keeps being fed its argmax but its ids stop growing (its outputs are ignored).
    """
    answers: list[list[int]] = [[] for _ in range(first_logits.shape[0])]
    done = [False] * len(answers)
    logits, positions = first_logits, next_positions[:, None]
    for _ in range(max_new_tokens):
        ids = logits[:, : codi.eot_id].argmax(-1)
        for b, token in enumerate(ids.tolist()):
            if not done[b]:
                answers[b].append(token)
                done[b] = token == codi.eos_id or len(answers[b]) == max_new_tokens
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        embeds = codi.hf.get_input_embeddings()(ids[:, None])
        logits = codi.hf(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits[:, -1]
        positions = positions + 1
    return answers


@torch.no_grad()
def nnsight_patch_batched(codi: NnsightCodi, tests: Sequence[PatchTest], *, strategy: str, max_new_tokens: int = MAX_NEW_TOKENS) -> list[CodiRun]:
    """`nnsight_patch` for B tests at once, each test a row of the same batch in every forward pass.

    This is nnsight's documented way to run many interventions: batch the inputs into one trace
    ("reduce loops with batching"); a plain `NNsight` wrapper takes one input invoke (several
    `tracer.invoke`s need a model class with `_batch`), so the B rows go in as one [B, n, d]
    `inputs_embeds` and each row's patch is an indexed write, `layers[L].output[rows, cols] = values`
    (one write per distinct layer in the pass, in layer order), so every row has its own layer and
    positions. One `DynamicCache` of batch B holds every row.

    Rows of different lengths share one batch: [question, bot] is left-padded so every row's latent
    t sits in the same column (and eot), the tail is right-padded; padding is zeros, masked out by the
    attention mask, and `position_ids` keep each row at its own positions (as `generate` does with a
    left-padded batch). Causal attention keeps right padding out of every real column; the cache is
    cropped back to eot before the decode.

    "parallel": one traced pass over [B, width] (logits computed from eot on only); "iterative": one
    pass over [question, bot] of all rows, one pass of B rows per latent t (rows with t in their set
    patch their layer's output there; latent t + 1 = prj(final-normed state), per row; these passes
    stop after the norm), then the tail pass. The greedy decode is batched too (`_batched_decode`:
    finished rows keep being fed, their outputs ignored). Every test needs the same number of
    latents K. Returns one `CodiRun` per test, in order: latents fed [K, d], logits at the last tail
    position [vocab], answer ids.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    if not tests:
        return []
    k = tests[0].corrupted_latents.shape[0]
    for test in tests:
        if test.corrupted_latents.shape[0] != k:
            raise ValueError(f"tests of one batch need the same number of latents: {test.corrupted_latents.shape[0]} and {k}")
        if not 0 <= test.layer < codi.n_layers:
            raise ValueError(f"layer {test.layer} out of range: the model has layers 0..{codi.n_layers - 1}")
        if any(not 0 <= t < k for t in test.latents):
            raise ValueError(f"latent indices {list(test.latents)} out of range 0..{k - 1}")
    dev = codi.device
    lay = _Layout.of(tests, k, dev)
    prefix = _padded_embeds(codi, [[*t.corrupted_ids, codi.bot_id] for t in tests], lay.prefix, left=True)
    tail = _padded_embeds(codi, [[codi.eot_id, *t.tail_ids] for t in tests], lay.width - lay.eot, left=False)
    cache = DynamicCache()
    if strategy == "parallel":
        fed = torch.stack([t.corrupted_latents for t in tests]).to(prefix)
        writes = [(t.layer, b, lay.prefix + i, t.clean_outputs[lay.n_prefix[b] + i]) for b, t in enumerate(tests) for i in t.latents]
        embeds = torch.cat([prefix, fed, tail], dim=1)
        _, logits = _batched_pass(codi, embeds, cache, lay.mask, lay.position_ids, _patches(writes, dev), logits_to_keep=lay.width - lay.eot)
    else:
        final, _ = _batched_pass(codi, prefix, cache, lay.mask[:, : lay.prefix], lay.position_ids[:, : lay.prefix], {}, logits_to_keep=None)
        steps = []
        for i in range(k):
            steps.append(codi.prj(final))
            col = lay.prefix + i
            writes = [(t.layer, b, 0, t.clean_outputs[lay.n_prefix[b] + i]) for b, t in enumerate(tests) if i in t.latents]
            final, _ = _batched_pass(codi, steps[-1][:, None], cache, lay.mask[:, : col + 1], lay.position_ids[:, col : col + 1], _patches(writes, dev), logits_to_keep=None)
        _, logits = _batched_pass(codi, tail, cache, lay.mask, lay.position_ids[:, lay.eot :], {}, logits_to_keep=lay.width - lay.eot)
        fed = torch.stack(steps, dim=1)
    cache.crop(lay.eot + 1 - cache.get_seq_length())  # back to eot: the tail (and its right padding) goes (a negative count removes)
    answers = _batched_decode(codi, logits[:, 0], cache, lay.mask[:, : lay.eot + 1], lay.position_ids[:, lay.eot] + 1, max_new_tokens)
    return [CodiRun(fed[b], logits[b, lay.n_tail[b]], answers[b]) for b in range(len(tests))]  # the last tail column, counted from eot
