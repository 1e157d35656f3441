"""`CodiModel`: the one place that runs the network.

Sequence layout (absolute positions, one question of `q` tokens including BOS, K latents):

    [question tokens 0..q-1] [bot q] [latent[0] q+1 .. latent[K-1] q+K] [eot q+K+1] [answer prefix ...]

Latent t's input embedding is `prj(h)` where `h` is the final-normed last-layer state (HF's
`hidden_states[-1]`) at the previous position (bot for t = 0). Every forward pass goes through
`CodiModel.forward`, which takes input embeddings (tokens are embedded with `W_E` first), so the
question, the latents and the answer tokens are all fed the same way; hooks are TransformerLens
hook names and see the activations of the chunk being run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.utilities import apply_softcap

from interp.data.align import answer_ids, answer_text

Hook = tuple[str, Callable]
#: (chunk start, chunk length) -> hooks for that chunk; lets a caller write at absolute positions.
ChunkHooks = Callable[[int, int], Sequence[Hook]]

NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> float | None:
    """The official CODI rule: the last number in the text, commas removed; None if there is none."""
    numbers = NUMBER_RE.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


@dataclass
class ForwardOutput:
    """logits [batch, pos, d_vocab]; final [batch, pos, d_model] (final-normed, what prj reads)."""

    logits: Tensor
    final: Tensor
    cache: ActivationCache | None = None


@dataclass
class Generation:
    """One greedy CODI generation.

    question_ids [q] (with BOS, without bot); latents [num_latents, d_model], the fed latent
    embeddings; answer_ids [n], the tokens generated after eot up to and including eos.
    """

    question_ids: Tensor
    latents: Tensor
    answer_ids: Tensor
    text: str
    answer: float | None


@dataclass
class Trace:
    """A free-running latent loop followed by eot and the teacher-forced answer prefix.

    input_embeds [seq, d_model] is what was fed at each position (latent positions hold the
    latents); tokens [seq] holds the token ids with -1 at latent positions. `cache` covers the
    whole sequence (batch dimension 1). `answer_logits` [d_vocab] are the raw logits at
    `answer_position`, the last prefix token, whose next token is the answer's first token.
    `next_logits` [d_vocab] are the logits at the last position (they predict the first token
    after everything teacher-forced: the answer's first differing token when the trace carries
    the common prefix of two answers). `answer` is the freely decoded answer (greedy from eot,
    the official rule).
    """

    question: str
    tokens: Tensor
    input_embeds: Tensor
    latents: Tensor
    cache: ActivationCache
    answer_logits: Tensor
    answer_position: int
    latent_positions: list[int]
    position_names: list[str]
    generation: Generation
    next_logits: Tensor
    answer_ids: Tensor | None = None

    @property
    def answer(self) -> float | None:
        return self.generation.answer

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_question_tokens(self) -> int:
        return self.latent_positions[0] - 1

    def position(self, name: str) -> int:
        """Absolute position of a named position (`bot`, `latent[2]`, `eot`, `answer`, `q[0]`)."""
        if name == "answer":
            return self.answer_position
        try:
            return self.position_names.index(name)
        except ValueError:
            raise KeyError(f"no position named {name!r}; names are {self.position_names}") from None


#: parameter name suffix -> permutation from the contiguous storage TransformerLens's forward wants to
#: the parameter's own shape. TL 3.9 rebuilds each weight in the layout F.linear wants on every pass
#: (`W.T.contiguous()`, an einops rearrange of W_Q/W_K/W_V/W_O): a copy of nearly every weight per
#: forward pass, which dominates small batches on a CPU. Stored in that layout, the same calls return
#: views of the storage: F.linear gets the same contiguous matrix, so every result is bitwise the same.
_LAYOUT = {
    "attn.W_Q": (0, 2, 1), "attn.W_K": (0, 2, 1), "attn.W_V": (0, 2, 1),  # [h, dm, dh] from [h, dh, dm]
    "attn._W_K": (0, 2, 1), "attn._W_V": (0, 2, 1),
    "attn.W_O": (1, 2, 0),  # [h, dh, dm] from [dm, h, dh]
    "mlp.W_in": (1, 0), "mlp.W_gate": (1, 0), "mlp.W_out": (1, 0),  # transposes
    "unembed.W_U": (1, 0),
}


def fast_layout(model: "CodiModel", enable: bool = True) -> int:
    """Store the weights in the layout TransformerLens's forward asks for (enable=False: plain layout).

    Values are unchanged and results are bitwise identical; only the strides of the parameters
    change. Returns the number of parameters changed.
    """
    changed = 0
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            perm = next((v for k, v in _LAYOUT.items() if name.endswith(k)), None)
            if perm is None:
                continue
            inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
            if enable:
                if p.data.permute(*inverse).is_contiguous():
                    continue
                p.data = p.data.permute(*inverse).contiguous().permute(*perm)
            else:
                if p.data.is_contiguous():
                    continue
                p.data = p.data.contiguous()
            changed += 1
    return changed


@dataclass
class CodiModel:
    """A CODI model: a `HookedTransformer`, its tokenizer, the projection `prj` and the special ids."""

    model: HookedTransformer
    tokenizer: Any
    prj: nn.Module
    pad_id: int
    bot_id: int
    eot_id: int
    num_latents: int = 6
    answer_prefix: str = "The answer is:"
    lora: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        fast_layout(self)  # same values, bitwise the same results, no per-pass weight copies

    # ------------------------------------------------------------------ basics

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.W_E.device

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def encode(self, question: str) -> Tensor:
        """Question token ids [q] as the official loop builds them: the tokenizer's BOS, no bot."""
        return torch.tensor(self.tokenizer(question)["input_ids"], dtype=torch.long)

    def prefix_ids(self) -> Tensor:
        """Token ids [p] of the answer prefix, as written after eot."""
        return torch.tensor(self.tokenizer(self.answer_prefix, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def answer_token_ids(self, answer: float | str) -> Tensor:
        """Token ids [n] of the answer as written after the prefix (" 18" -> " " + "18" on Llama-3)."""
        ids = answer_ids(self.tokenizer, answer, self.answer_prefix)
        if ids is None:
            raise ValueError(
                f"the answer {answer_text(answer)!r} changes how the prefix {self.answer_prefix!r} tokenizes; "
                "the answer's tokens cannot be separated from the prefix"
            )
        return torch.tensor(ids, dtype=torch.long)

    def embed(self, tokens: Tensor) -> Tensor:
        """Input embeddings [..., d_model] of token ids (rows of W_E)."""
        return self.model.W_E[tokens.to(self.device)]

    def project(self, final: Tensor) -> Tensor:
        """The next latent's input embedding from a final-normed state [..., d_model]."""
        return self.prj(final)

    # ------------------------------------------------------------------ the forward pass

    def forward(
        self,
        embeds: Tensor,
        *,
        kv_cache: TransformerLensKeyValueCache | None = None,
        attention_mask: Tensor | None = None,
        fwd_hooks: Sequence[Hook] = (),
        with_cache: bool = False,
        logit_positions: Sequence[int] | None = None,
    ) -> ForwardOutput:
        """Run the network on input embeddings [batch, pos, d_model].

        With a KV cache, the chunk attends to everything cached before it. `attention_mask`
        [batch, pos] marks real positions of this chunk (left padding = 0); when a KV cache is
        used it is appended to the cache's mask. User hooks run before the internal capture of
        the final-normed state, so a hook that patches it changes what `prj` reads.
        `logit_positions` (chunk-relative) unembeds only those positions: logits are then
        [batch, len(logit_positions), d_vocab] (empty list: no unembedding at all); the same
        modules run, so the values equal the full logits at those positions.
        """
        if kv_cache is not None:
            chunk_mask = attention_mask if attention_mask is not None else torch.ones(embeds.shape[:2], dtype=torch.long)
            attention_mask = kv_cache.append_attention_mask(chunk_mask.to(self.device))
        captured: dict[str, Tensor] = {}

        def grab_normalized(act: Tensor, hook) -> None:
            captured["normalized"] = act

        hooks = list(fwd_hooks) + [("ln_final.hook_normalized", grab_normalized)]
        kwargs = dict(start_at_layer=0, past_kv_cache=kv_cache, attention_mask=attention_mask)
        cache = None
        if logit_positions is not None:
            if with_cache:
                raise ValueError("logit_positions and with_cache do not go together (the cache would lack ln_final)")
            kwargs["stop_at_layer"] = self.cfg.n_layers  # stop before ln_final and the unembedding
        with self.model.hooks(fwd_hooks=hooks):
            if with_cache:
                logits, cache = self.model.run_with_cache(embeds, **kwargs)
            else:
                logits = self.model(embeds, **kwargs)
            if logit_positions is not None:  # the residual: finish the pass at the chosen positions
                normed = self.model.ln_final(logits)
                logits = apply_softcap(self.model.unembed(normed[:, list(logit_positions)]), self.cfg.output_logits_soft_cap)
        # hook_normalized is x / rms(x); HF's hidden_states[-1] (what prj reads) includes the weight.
        # In bf16/fp16 TransformerLens normalizes in fp32 and casts back before the weight (as HF does).
        final = captured["normalized"].to(self.cfg.dtype) * self.model.ln_final.w
        return ForwardOutput(logits=logits, final=final, cache=cache)

    # ------------------------------------------------------------------ the latent loop

    def question_batch(self, questions: Sequence[str]) -> tuple[list[Tensor], Tensor, Tensor]:
        """Left-padded question + bot inputs.

        Returns (question ids per row, input embeddings [batch, pos, d_model], mask [batch, pos]).
        """
        ids = [self.encode(q) for q in questions]
        width = max(len(x) for x in ids) + 1
        tokens = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            tokens[row, width - len(x) - 1 : -1] = x
            tokens[row, -1] = self.bot_id
            mask[row, width - len(x) - 1 :] = 1
        return ids, self.embed(tokens), mask

    def run_latents(
        self,
        prompt_embeds: Tensor,
        prompt_mask: Tensor | None = None,
        *,
        chunk_hooks: ChunkHooks | None = None,
        fwd_hooks: Sequence[Hook] = (),
    ) -> tuple[Tensor, TransformerLensKeyValueCache]:
        """Prefill the prompt (question + bot), then run the latent loop with a KV cache.

        prompt_embeds [batch, p, d_model]. Returns the fed latents [batch, num_latents, d_model]
        and the KV cache after the last latent. `chunk_hooks(start, length)` gives hooks for
        each forward pass (start = absolute position of the chunk's first input), so a patch can
        be written at the step that computes its position; `fwd_hooks` are active in every pass.
        """
        batch, p, _ = prompt_embeds.shape
        kv_cache = TransformerLensKeyValueCache.init_cache(self.cfg, self.device, batch)

        def hooks(start: int, length: int) -> list[Hook]:
            return list(fwd_hooks) + (list(chunk_hooks(start, length)) if chunk_hooks else [])

        out = self.forward(prompt_embeds, kv_cache=kv_cache, attention_mask=prompt_mask, fwd_hooks=hooks(0, p))
        latents = []
        for t in range(self.num_latents):
            latent = self.project(out.final[:, -1:])
            latents.append(latent)
            out = self.forward(latent, kv_cache=kv_cache, fwd_hooks=hooks(p + t, 1))
        return torch.cat(latents, dim=1), kv_cache

    def greedy_decode(
        self,
        first_embeds: Tensor,
        kv_cache: TransformerLensKeyValueCache,
        *,
        max_new_tokens: int = 32,
        fwd_hooks: Sequence[Hook] = (),
    ) -> list[Tensor]:
        """Feed first_embeds [batch, n, d_model] (e.g. eot), then decode greedily.

        Logits are restricted to ids < eot (the official code drops the last vocabulary row).
        Returns per row the generated ids up to and including eos.
        """
        batch = first_embeds.shape[0]
        out = self.forward(first_embeds, kv_cache=kv_cache, fwd_hooks=fwd_hooks)
        generated = torch.empty((batch, 0), dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            next_ids = out.logits[:, -1, : self.eot_id].argmax(dim=-1)
            generated = torch.cat([generated, next_ids[:, None]], dim=1)
            done |= next_ids == self.eos_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            out = self.forward(self.embed(next_ids[:, None]), kv_cache=kv_cache, fwd_hooks=fwd_hooks)
        rows = []
        for row in generated.cpu():
            eos = (row == self.eos_id).nonzero()
            rows.append(row[: int(eos[0]) + 1] if len(eos) else row)
        return rows

    @torch.no_grad()
    def generate_batch(
        self, questions: Sequence[str], max_new_tokens: int = 32, fwd_hooks: Sequence[Hook] = ()
    ) -> list[Generation]:
        """The official evaluation loop for many questions at once (left padding, KV cache).

        Results equal `generate` on each question alone. Hook positions are those of the padded
        batch, so pass position-dependent hooks only with one question at a time.
        """
        ids, embeds, mask = self.question_batch(questions)
        latents, kv_cache = self.run_latents(embeds, mask, fwd_hooks=fwd_hooks)
        eot = self.embed(torch.full((len(ids), 1), self.eot_id, dtype=torch.long))
        answers = self.greedy_decode(eot, kv_cache, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks)
        out = []
        for q_ids, lat, ans in zip(ids, latents.cpu(), answers):
            text = self.tokenizer.decode(ans, skip_special_tokens=True)
            out.append(Generation(q_ids, lat, ans, text, extract_answer(text)))
        return out

    def generate(self, question: str, max_new_tokens: int = 32, fwd_hooks: Sequence[Hook] = ()) -> Generation:
        """Greedy CODI generation for one question, with `fwd_hooks` active in every pass."""
        return self.generate_batch([question], max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks)[0]

    # ------------------------------------------------------------------ traces

    def sequence(self, question_ids: Tensor, latents: Tensor, answer_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The teacher-forced sequence [question, bot, latents, eot, prefix, (answer)].

        Returns (tokens [seq] with -1 at latent positions, input embeddings [seq, d_model]).
        """
        k = latents.shape[0]
        parts = [question_ids, torch.tensor([self.bot_id]), torch.full((k,), -1), torch.tensor([self.eot_id]), self.prefix_ids()]
        if answer_ids is not None:
            parts.append(answer_ids)
        tokens = torch.cat(parts).long()
        embeds = self.embed(tokens.clamp(min=0))
        q = len(question_ids)
        embeds[q + 1 : q + 1 + k] = latents.to(embeds)
        return tokens, embeds

    def position_names(self, num_question_tokens: int, seq_len: int) -> list[str]:
        """Names of the positions of a sequence: q[i], bot, latent[t], eot, prefix[i], answer[i]."""
        k, p = self.num_latents, len(self.prefix_ids())
        names = [f"q[{i}]" for i in range(num_question_tokens)] + ["bot"]
        names += [f"latent[{t}]" for t in range(k)] + ["eot"] + [f"prefix[{i}]" for i in range(p)]
        names += [f"answer[{i}]" for i in range(seq_len - len(names))]
        return names

    @torch.no_grad()
    def trace(self, question: str, answer: float | str | Tensor | None = None, max_new_tokens: int = 32) -> Trace:
        """Free latent loop, then eot and the teacher-forced prefix, cached over the whole sequence.

        `answer` (a number, its text, or answer token ids [n]) is teacher-forced after the prefix.
        """
        gen = self.generate(question, max_new_tokens=max_new_tokens)
        answer_ids = answer if answer is None or isinstance(answer, Tensor) else self.answer_token_ids(answer)
        return self.trace_from(question, gen, gen.latents, answer_ids)

    def trace_from(
        self, question: str, generation: Generation, latents: Tensor, answer_ids: Tensor | None, fwd_hooks: Sequence[Hook] = ()
    ) -> Trace:
        """A `Trace` of one teacher-forced pass with the given latents [K, d_model] and hooks."""
        tokens, embeds = self.sequence(generation.question_ids, latents, answer_ids)
        out = self.forward(embeds[None], fwd_hooks=fwd_hooks, with_cache=True)
        q = len(generation.question_ids)
        answer_position = q + self.num_latents + 1 + len(self.prefix_ids())
        return Trace(
            question=question,
            tokens=tokens,
            input_embeds=embeds,
            latents=latents,
            cache=out.cache,
            answer_logits=out.logits[0, answer_position],
            answer_position=answer_position,
            latent_positions=list(range(q + 1, q + 1 + self.num_latents)),
            position_names=self.position_names(q, len(tokens)),
            generation=generation,
            next_logits=out.logits[0, -1],
            answer_ids=answer_ids,
        )

    # ------------------------------------------------------------------ latent decoding

    @torch.no_grad()
    def decode_latents(self, gen: Generation | Trace, k: int = 5) -> list[dict[str, list[tuple[str, float]]]]:
        """Top-k vocabulary tokens of each latent, as in the CODI paper's latent decoding.

        For latent t: `state` = the unembedding of the final-normed state computed at latent t's
        position (the vector that prj turns into latent t+1); `embedding` = latent t's fed
        embedding through the unembedding. Probabilities are softmaxes over ids < eot.
        """
        generation = gen.generation if isinstance(gen, Trace) else gen
        tokens, embeds = self.sequence(generation.question_ids, generation.latents)
        out = self.forward(embeds[None])
        q = len(generation.question_ids)
        rows = []
        for t in range(self.num_latents):
            state_logits = out.logits[0, q + 1 + t, : self.eot_id]
            emb_logits = (generation.latents[t].to(self.device) @ self.model.W_U)[: self.eot_id]
            rows.append({"state": self._top_tokens(state_logits, k), "embedding": self._top_tokens(emb_logits, k)})
        return rows

    def _top_tokens(self, logits: Tensor, k: int) -> list[tuple[str, float]]:
        probs = logits.float().softmax(-1)
        top = probs.topk(k)
        return [(self.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
