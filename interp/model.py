"""`LatentModel`: the one place that runs the network, for both families (CODI and Coconut).

Every forward pass goes through `LatentModel.forward`, which takes input embeddings (tokens are
embedded with `W_E` first), so the question, the latents and the answer tokens are all fed the
same way. Positions follow `interp.layout.SequenceLayout`:

    [question] [question suffix] [bot] [latent[0] .. latent[K-1]] [eot] [eot suffix] [answer prefix] [answer]

(`bot`/`eot` are the family's begin/end-of-thoughts markers: CODI's bot and eot, Coconut's
`<|start-latent|>` and `<|end-latent|>`; see `interp.family`.)

The latent loop: latent 0's input embedding is the thought map of `h`, the final-normed last-layer
state (HF's `hidden_states[-1]`) at bot; latent t+1's is the thought map of the state at latent t.
The thought map is CODI's `prj` or, for Coconut, the identity; it runs through the hook points
`prj.hook_in`, `prj.hook_hidden` (CODI only) and `hook_thought` (the vector fed next), so at
position p the cache holds the thought the model makes there. The loop runs one position per
forward pass over a KV cache (`latent_steps`), the one greedy decode is `greedy_decode`;
generation, traces and the patching engine all use these two.

Hooks are TransformerLens hook names. A hook function sees the activations of the chunk being run;
wrap it in `interp.at_positions(fn, positions)` to have it applied at absolute sequence positions,
whichever chunk (prompt, one latent step, the answer) holds them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import apply_softcap

from interp.data.align import answer_ids, answer_text
from interp.family import CODI, Answer, Family
from interp.hooks import Hook, bind_hooks
from interp.kvcache import select_rows
from interp.layout import MAX_NEW_TOKENS, SequenceLayout

#: vocabulary rows per matmul in the CPU unembedding (`LatentModel._unembed`): SmolLM2's 49k x 576 product
#: ran at 0.6-0.8x the rate of the same product in 2,048-row slices (MKL, one thread)
UNEMBED_CHUNK = 2048

#: (chunk start column, chunk length) -> hooks for that chunk; lets a caller write at absolute positions.
ChunkHooks = Callable[[int, int], Sequence[Hook]]


#: n-gram lookup drafts ("prompt lookup decoding") for a row that no given draft continues: the latest earlier
#: occurrence of its last LOOKUP_NGRAM tokens (then of fewer) proposes the LOOKUP_TOKENS that followed there.
LOOKUP_NGRAM, LOOKUP_TOKENS = 2, 6


def draft_feed(generated: Sequence[int], drafts: Sequence[Sequence[int]], max_new_tokens: int, eos: int, lookup: bool = True) -> list[int]:
    """What one decode pass feeds a row: its last generated token, then the rest of the first draft
    that starts with everything generated, else (`lookup`) the tokens `lookup_guess` finds; up to the last
    token whose successor is still needed, and before any eos. Just the last token when neither finds one."""
    n = len(generated)

    def guesses():  # lazily: the first that gives a token is fed
        yield from (list(d[n:]) for d in drafts if len(d) > n and list(d[:n]) == list(generated))
        if lookup:
            yield lookup_guess(generated, drafts)

    for rest in guesses():
        rest = rest[: max(0, max_new_tokens - 1 - n)]
        rest = rest[: rest.index(eos)] if eos in rest else rest
        if rest:
            return [generated[-1], *rest]
    return [generated[-1]]


def lookup_guess(generated: Sequence[int], drafts: Sequence[Sequence[int]]) -> list[int]:
    """Up to LOOKUP_TOKENS tokens that followed the latest earlier occurrence of the last LOOKUP_NGRAM tokens of
    `generated` (then of fewer), searched in `generated` itself, then in each draft; [] where none occurs.
    A guess only: the decode keeps the tokens its greedy ids confirm, so it changes passes, never tokens."""
    n = len(generated)
    for g in range(min(LOOKUP_NGRAM, n), 0, -1):
        tail = list(generated[n - g :])
        for seq in (list(generated), *(list(d) for d in drafts)):
            for s in range(len(seq) - g - 1, -1, -1):  # a token follows the occurrence (in generated: not the tail itself)
                if seq[s : s + g] == tail:
                    return seq[s + g : s + g + LOOKUP_TOKENS]
    return []


@dataclass
class ForwardOutput:
    """logits [batch, pos, d_vocab] (None when only the greedy ids were asked for); final [batch, pos, d_model]
    (final-normed, what the thought map reads); thoughts [batch, pos, d_model] (the thought map's output at
    every position) and greedy [batch, n] (the greedy next ids at the logit positions) when asked."""

    logits: Tensor | None
    final: Tensor
    cache: ActivationCache | None = None
    thoughts: Tensor | None = None
    greedy: Tensor | None = None


@dataclass
class Generation:
    """One greedy generation.

    question_ids [q] (the question as the family writes and tokenizes it, BOS included where the
    tokenizer adds one, without bot); latents [num_latents, d_model], the fed thoughts; answer_ids
    [n], the tokens generated after eot up to and including eos; answer: by the family's rule
    (a number, a text such as a ProsQA sentence, or None).
    """

    question_ids: Tensor
    latents: Tensor
    answer_ids: Tensor
    text: str
    answer: Answer


@dataclass
class Trace:
    """A free-running latent loop followed by eot and the teacher-forced answer prefix.

    input_embeds [seq, d_model] is what was fed at each position (latent positions hold the
    latents); tokens [seq] holds the token ids with -1 at latent positions. `cache` covers the
    whole sequence (batch dimension 1; the hooks kept by `names_filter`). `answer_logits` [d_vocab]
    are the raw logits at `answer_position`, the last prefix token, whose next token is the
    answer's first token. `next_logits` [d_vocab] are the logits at the last position (they
    predict the first token after everything teacher-forced: the answer's first differing token
    when the trace carries the common prefix of two answers). `answer` is the freely decoded
    answer (greedy from eot, the official rule). `layout` names every position.
    """

    question: str
    tokens: Tensor
    input_embeds: Tensor
    latents: Tensor
    cache: ActivationCache
    answer_logits: Tensor
    layout: SequenceLayout
    generation: Generation
    next_logits: Tensor
    answer_ids: Tensor | None = None

    @property
    def answer(self) -> Answer:
        return self.generation.answer

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    @property
    def answer_position(self) -> int:
        return self.layout.answer_position

    @property
    def latent_positions(self) -> list[int]:
        return self.layout.latent_positions

    @property
    def position_names(self) -> list[str]:
        return self.layout.names

    def position(self, name: str) -> int:
        """Absolute position of a named position (`bot`, `latent[2]`, `eot`, `answer`, `q[0]`)."""
        return self.layout.position(name)


#: parameter name suffix -> permutation from the contiguous storage TransformerLens's forward wants to
#: the parameter's own shape. TL 3.9 rebuilds each weight in the layout F.linear wants on every pass
#: (`W.T.contiguous()`, an einops rearrange of W_Q/W_K/W_V/W_O): a copy of nearly every weight per
#: forward pass, which dominates small batches on a CPU. Stored in that layout, the same calls return
#: views of the storage: F.linear gets the same contiguous matrix, so every result is bitwise the same.
_LAYOUT = {
    "attn.W_Q": (0, 2, 1),
    "attn.W_K": (0, 2, 1),
    "attn.W_V": (0, 2, 1),  # [h, dm, dh] from [h, dh, dm]
    "attn._W_K": (0, 2, 1),
    "attn._W_V": (0, 2, 1),
    "attn.W_O": (1, 2, 0),  # [h, dh, dm] from [dm, h, dh]
    "mlp.W_in": (1, 0),
    "mlp.W_gate": (1, 0),
    "mlp.W_out": (1, 0),  # transposes
    "unembed.W_U": (1, 0),
}


def fast_layout(model: LatentModel, enable: bool = True) -> int:
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


class PrjHooks(nn.Module):
    """CODI's `prj` hook points, registered on the `HookedTransformer` (they hold no parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_in = HookPoint()  # [batch, pos, d_model]: the final-normed state prj reads
        self.hook_hidden = HookPoint()  # [batch, pos, d_prj]: after Linear and GELU


@dataclass
class LatentModel:
    """A continuous-thought model: a `HookedTransformer`, its tokenizer, the thought map and the markers.

    prj: CODI's projection (Dropout -> Linear -> GELU -> Linear [-> LayerNorm]); None for Coconut,
    whose thought map is the identity. bot_id / eot_id: the begin/end-of-thoughts markers (CODI's
    bot and eot; Coconut's `<|start-latent|>` and `<|end-latent|>`); pad_id fills left padding.
    family: the text format (`interp.family`). Loaders: `interp.load_codi`, `interp.load_coconut`,
    `interp.load_model` (either, by the checkpoint's keys).
    """

    model: HookedTransformer
    tokenizer: Any
    prj: nn.Module | None
    pad_id: int
    bot_id: int
    eot_id: int
    num_latents: int = 6
    answer_prefix: str = CODI.answer_prefix
    lora: dict[str, Any] = field(default_factory=dict)
    #: tokens fed after the question, before bot ([eos] for CODI checkpoints trained with remove_eos=False)
    question_suffix_ids: tuple[int, ...] = ()
    #: tokens fed after eot, before decoding ([eos] for CODI checkpoints trained with remove_eos=False)
    eot_suffix_ids: tuple[int, ...] = ()
    #: how the model was loaded (checkpoint, base, lora_alpha, ...), for provenance
    load_options: dict[str, Any] = field(default_factory=dict)
    family: Family = CODI

    def __post_init__(self) -> None:
        if self.num_latents < 0:
            raise ValueError(f"num_latents must be >= 0, got {self.num_latents}")
        fast_layout(self)  # same values, bitwise the same results, no per-pass weight copies
        if "hook_thought" not in self.model.hook_dict:  # the thought map's hook points, by name like every other hook
            self.model.hook_thought = HookPoint()
            if self.prj is not None:
                self.model.prj = PrjHooks()
            self.model.setup()

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

    @property
    def decode_vocab(self) -> int:
        """Greedy decoding (and the lens) consider ids < this: eot for CODI, the whole vocabulary for Coconut."""
        return self.eot_id if self.family.decode_below_eot else self.cfg.d_vocab_out

    def with_latents(self, num_latents: int) -> LatentModel:
        """The same network run with another number of thoughts (0 included); shares every weight."""
        if num_latents == self.num_latents:
            return self
        if num_latents < 0:
            raise ValueError(f"num_latents must be >= 0, got {num_latents}")
        other = copy.copy(self)
        other.num_latents = num_latents
        return other

    def extract_answer(self, text: str) -> Answer:
        """The answer in a decoded text, by the family's official rule (`interp.family`)."""
        return self.family.extract_answer(text)

    def encode(self, question: str) -> Tensor:
        """Question token ids [q] as the official loop builds them: the family's text (Coconut adds
        a newline), with the tokenizer's special tokens (BOS where it adds one), no bot."""
        return torch.tensor(self.tokenizer(self.family.question_text(question))["input_ids"], dtype=torch.long)

    def prefix_ids(self) -> Tensor:
        """Token ids [p] of the answer prefix, as written after eot."""
        return torch.tensor(self.tokenizer(self.answer_prefix, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def answer_token_ids(self, answer: float | str) -> Tensor:
        """Token ids [n] of the answer as written after the prefix (" 18" -> " " + "18" on Llama-3)."""
        ids = answer_ids(self.tokenizer, answer, self.answer_prefix)
        if ids is None:
            raise ValueError(f"the answer {answer_text(answer)!r} changes how the prefix {self.answer_prefix!r} tokenizes; the answer's tokens cannot be separated from the prefix")
        return torch.tensor(ids, dtype=torch.long)

    def embed(self, tokens: Tensor) -> Tensor:
        """Input embeddings [..., d_model] of token ids (rows of W_E)."""
        return self.model.W_E[tokens.to(self.device)]

    def thought_map(self, final: Tensor) -> Tensor:
        """The next thought's input embedding from final-normed states [batch, pos, d_model], through
        the hook points (`prj.hook_in`, `prj.hook_hidden`, `hook_thought`): call it where hooks are active."""
        if self.prj is None:
            return self.model.hook_thought(final)
        hidden = self.model.prj.hook_hidden(self.prj[:3](self.model.prj.hook_in(final)))  # Dropout, Linear, GELU
        return self.model.hook_thought(self.prj[3:](hidden))  # Linear [, LayerNorm]

    # ------------------------------------------------------------------ the forward pass

    def forward(
        self,
        embeds: Tensor,
        *,
        kv_cache: TransformerLensKeyValueCache | None = None,
        attention_mask: Tensor | None = None,
        fwd_hooks: Sequence[Hook] = (),
        with_cache: bool = False,
        names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
        logit_positions: Sequence[int] | None = None,
        start: int = 0,
        offsets: Sequence[int] | None = None,
        start_layer: int = 0,
        thoughts: bool = False,
        greedy: bool = False,
    ) -> ForwardOutput:
        """Run the network on input embeddings [batch, pos, d_model] (with `start_layer` L > 0: on
        the residual stream entering block L, `blocks.L.hook_resid_pre`, running blocks L.. only;
        a KV cache must then already hold this chunk's keys and values for blocks < L).

        With a KV cache, the chunk attends to everything cached before it. `attention_mask`
        [batch, pos] marks real positions of this chunk (left padding = 0); when a KV cache is
        used it is appended to the cache's mask. `start` is the chunk's first column and
        `offsets[r]` row r's left padding: hooks made with `interp.at_positions` are bound with
        them. User hooks run before the internal capture of the final-normed state, so a hook that
        patches it changes what the thought map reads. `thoughts` (always with `with_cache`) runs the
        thought map over every position of the chunk, with its hooks (`ForwardOutput.thoughts`). `logit_positions` (chunk-relative) unembeds only
        those positions: logits are then [batch, len(logit_positions), d_vocab] (empty list: no
        unembedding at all); the same modules run, so the values equal the full logits there. `greedy`
        (with `logit_positions`) returns the greedy next ids there instead of the logits (`_greedy_ids`).
        """
        if kv_cache is not None:
            chunk_mask = attention_mask if attention_mask is not None else torch.ones(embeds.shape[:2], dtype=torch.long)
            attention_mask = kv_cache.append_attention_mask(chunk_mask.to(self.device))
        captured: dict[str, Tensor] = {}

        def grab_normalized(act: Tensor, hook) -> None:
            captured["normalized"] = act

        hooks = bind_hooks(fwd_hooks, start, embeds.shape[1], offsets) + [("ln_final.hook_normalized", grab_normalized)]
        kwargs = dict(start_at_layer=start_layer, past_kv_cache=kv_cache, attention_mask=attention_mask)
        if greedy and logit_positions is None:
            raise ValueError("greedy ids are read at logit_positions: give them")
        if logit_positions is not None:
            if with_cache:
                raise ValueError("logit_positions and with_cache do not go together (the cache would lack ln_final)")
            kwargs["stop_at_layer"] = self.cfg.n_layers  # stop before ln_final and the unembedding
        # the caching hooks run after the user's (as in run_with_cache), and see hook_pos_embed too
        cache_dict, cache_hooks, _ = self.model.get_caching_hooks(names_filter) if with_cache else ({}, [], [])
        with self.model.hooks(fwd_hooks=hooks + cache_hooks):
            if self.cfg.positional_embedding_type == "standard" and start_layer == 0:  # learned positions (GPT-2)
                embeds = embeds + self._position_embeds(embeds.shape[0], embeds.shape[1], attention_mask)
            logits = self.model(embeds, **kwargs)
            if logit_positions is not None:  # the residual: finish the pass at the chosen positions
                normed = self.model.ln_final(logits)[:, list(logit_positions)]
                if greedy:
                    next_ids, logits = self._greedy_ids(normed), None
                else:
                    logits = apply_softcap(self._unembed(normed), self.cfg.output_logits_soft_cap)
            # hook_normalized is the normalized x before the norm's weight (and LayerNorm's bias); HF's
            # hidden_states[-1] (what the thought map reads) includes them. In bf16/fp16 TransformerLens
            # normalizes in fp32 and casts back before the weight (as HF does).
            final = captured["normalized"].to(self.cfg.dtype) * self.model.ln_final.w
            if self.cfg.normalization_type == "LN":
                final = final + self.model.ln_final.b
            made = self.thought_map(final) if thoughts or with_cache else None
        cache = ActivationCache(cache_dict, self.model) if with_cache else None
        return ForwardOutput(logits=logits, final=final, cache=cache, thoughts=made, greedy=next_ids if greedy else None)

    def _unembed(self, normed: Tensor) -> Tensor:
        """TransformerLens's `Unembed` on final-normed states [batch, n, d_model] -> logits [batch, n, d_vocab_out],
        through its hook points (`unembed.hook_in`, `unembed.hook_out`). On a CPU the product runs in
        `_logit_slices`; elsewhere as one `F.linear`.
        """
        unembed = self.model.unembed
        x = unembed.hook_in(normed)
        if x.device.type != "cpu":
            return unembed.hook_out(F.linear(x, unembed.W_U.T.contiguous(), unembed.b_U))
        return unembed.hook_out(torch.cat([logits for _, logits in self._logit_slices(x, unembed.W_U.shape[1])], dim=-1))

    def _logit_slices(self, x: Tensor, vocab: int) -> Iterator[tuple[int, Tensor]]:
        """The CPU unembedding of x [batch, n, d_model] over ids < vocab, in slices of `UNEMBED_CHUNK` ids:
        yields (first id, logits [batch, n, slice]), `b_U` added only where it is non-zero.

        One [rows, d_model] x [d_model, 49k] product runs far below the CPU's matmul rate: its weight does
        not stay in cache; slices of it do. `F.linear` with a bias first copies the bias into every row of the
        output, a [rows, vocab] write. The slices round like any other batch size: the logits are those of one
        product to within float rounding.
        """
        unembed = self.model.unembed
        weight, bias = unembed.W_U.T, unembed.b_U  # weight [d_vocab_out, d_model]
        has_bias = bool(bias[:vocab].any())
        for a in range(0, vocab, UNEMBED_CHUNK):
            b = min(a + UNEMBED_CHUNK, vocab)
            logits = F.linear(x, weight[a:b])
            if has_bias:
                logits += bias[a:b]
            yield a, logits

    def _greedy_ids(self, normed: Tensor) -> Tensor:
        """The greedy next ids [batch, n] (argmax over ids < `decode_vocab`, the first on ties) of final-normed
        states [batch, n, d_model]: on a CPU, `_logit_slices` with a running maximum, never holding the
        [rows, vocab] logits (their write and the argmax pass over them cost a quarter of the unembedding
        there). The slices are `_unembed`'s (the last cut at `decode_vocab`), so the ids are the argmax of its
        logits to within float rounding. With a hook on the unembedding (or off the CPU) the logits are made
        whole, through the hooks."""
        unembed, vocab, cap = self.model.unembed, self.decode_vocab, self.cfg.output_logits_soft_cap
        if normed.device.type != "cpu" or unembed.hook_in.has_hooks("fwd") or unembed.hook_out.has_hooks("fwd"):
            return apply_softcap(self._unembed(normed), cap)[..., :vocab].argmax(dim=-1)
        best = ids = None
        for a, logits in self._logit_slices(normed, vocab):
            value, index = apply_softcap(logits, cap).max(dim=-1)
            if best is None:
                best, ids = value, index
            else:  # strictly greater: on a tie the earlier (lower) id stays, as argmax keeps the first
                better = value > best
                best, ids = torch.where(better, value, best), torch.where(better, index + a, ids)
        return ids

    def _position_embeds(self, batch: int, n: int, mask: Tensor | None) -> Tensor:
        """Learned position embeddings [batch, n, d_model] of a chunk, through `hook_pos_embed`.

        TransformerLens adds `W_pos` only when it embeds tokens itself; fed embeddings
        (`start_at_layer=0`) skip it, so `forward` adds it. mask [batch, cached + n] is the full
        attention mask (KV cache + chunk), None for an unpadded chunk without cache. A real column's
        position is the number of real columns before it (cumsum(mask) - 1), so a left-padded row,
        or one with masked-out columns, gets the positions it would have alone (latent i of an
        L-token prompt at L + i, as HF GPT-2 at batch 1); padded columns get zeros.
        """
        offset = 0 if mask is None else mask.shape[1] - n
        positions_of = torch.zeros((batch, n), dtype=torch.long, device=self.device)  # only its shape is read
        return self.model.hook_pos_embed(self.model.pos_embed(positions_of, offset, mask))

    # ------------------------------------------------------------------ the latent loop

    def prompt_ids(self, question: str) -> Tensor:
        """The tokens fed before the first latent [n_prompt]: question (with BOS), its suffix, bot."""
        return torch.cat([self.encode(question), torch.tensor(self.question_suffix_ids, dtype=torch.long), torch.tensor([self.bot_id])])

    def check_question(self, question: str, n_answer: int = 0, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        """Refuse (ValueError, one line) an empty question, or one whose sequence would not fit the
        context: the prompt, the thoughts, the tail with `n_answer` teacher-forced answer tokens, and
        `max_new_tokens` decoded after the last fed position."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"empty question ({question!r}): give the text of a problem")
        q = len(self.encode(question))
        layout = self.layout(q, n_answer)
        need = max(layout.seq_len, layout.decode_start + max_new_tokens)
        if need > self.cfg.n_ctx:
            raise ValueError(
                f"the question needs {need} positions ({q} question tokens, {self.num_latents} thoughts, the answer and {max_new_tokens} decoded tokens), "
                f"more than the model's context of {self.cfg.n_ctx}: shorten the question or decode fewer tokens"
            )

    def tail_ids(self, answer_ids: Tensor | None = None) -> Tensor:
        """The tokens fed after the latents [n]: eot, its suffix, the answer prefix, the answer."""
        parts = [torch.tensor([self.eot_id, *self.eot_suffix_ids], dtype=torch.long), self.prefix_ids()]
        return torch.cat(parts + ([answer_ids.long()] if answer_ids is not None else []))

    def layout(self, n_question: int, n_answer: int = 0) -> SequenceLayout:
        """The layout of a sequence with `n_question` question tokens and `n_answer` answer tokens."""
        return SequenceLayout(
            n_question=n_question,
            num_latents=self.num_latents,
            n_prefix=len(self.prefix_ids()),
            n_answer=n_answer,
            n_question_suffix=len(self.question_suffix_ids),
            n_eot_suffix=len(self.eot_suffix_ids),
        )

    def left_padded(self, sequences: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[int]]:
        """Token sequences [n_i] -> (embeddings [batch, width, d_model], mask [batch, width], offsets)."""
        width = max(len(x) for x in sequences)
        tokens = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, x in enumerate(sequences):
            tokens[row, width - len(x) :] = x
            mask[row, width - len(x) :] = 1
        return self.embed(tokens), mask, [width - len(x) for x in sequences]

    def latent_steps(
        self,
        latents: Tensor,
        kv_cache: TransformerLensKeyValueCache,
        first: int,
        width: int,
        *,
        hooks: ChunkHooks,
        feedback_hooks: ChunkHooks | None = None,
        offsets: Sequence[int] | None = None,
    ) -> None:
        """The latent loop from latent `first` on: feed latent t, map its state into latent t+1.

        latents [batch, K, d_model]: latent `first` must hold its input; latents after it are
        overwritten with what the loop feeds. Latent t sits at column `width + t`.
        `hooks(start, length)` are active in every pass. `feedback_hooks(start, length)` (the
        feedback strategy) are active only in a pass whose keys and values are not kept: at a step
        where they apply, the position is run with them on a frozen cache (its state mapped into
        the next latent), then again without them, which is what later positions attend to.
        """
        for t in range(first, self.num_latents):
            col, x = width + t, latents[:, t : t + 1]
            extra = list(feedback_hooks(col, 1)) if feedback_hooks is not None else []
            fed = t + 1 < self.num_latents  # the thought made at the last latent is not fed
            if extra:
                kv_cache.freeze()
                try:
                    out = self.forward(x, kv_cache=kv_cache, fwd_hooks=[*hooks(col, 1), *extra], logit_positions=[], start=col, offsets=offsets, thoughts=fed)
                finally:
                    kv_cache.unfreeze()
                self.forward(x, kv_cache=kv_cache, fwd_hooks=hooks(col, 1), logit_positions=[], start=col, offsets=offsets)
            else:
                out = self.forward(x, kv_cache=kv_cache, fwd_hooks=hooks(col, 1), logit_positions=[], start=col, offsets=offsets, thoughts=fed)
            if fed:
                latents[:, t + 1] = out.thoughts[:, -1].to(latents)

    def greedy_decode(
        self,
        logits: Tensor,
        forced: Tensor | None,
        kv_cache: TransformerLensKeyValueCache,
        *,
        max_new_tokens: int,
        fwd_hooks: Sequence[Hook] = (),
        offsets: Sequence[int] | None = None,
        drafts: Sequence[Sequence[Sequence[int]]] | None = None,
        lookup: bool = True,
    ) -> list[Tensor]:
        """Greedy decoding, continuing a teacher-forced chunk already in `kv_cache`.

        logits [batch, n, d_vocab]: the logits at the chunk's last n columns, the first of which
        is the last position fed before decoding (eot or its suffix); forced [batch, n-1] the
        tokens fed at the other n-1 columns (-1 = right padding; None when n = 1). While a row's
        greedy token equals the forced one, the forced column is the decode's own step (the same
        computation) and is reused; from the first disagreement the row's remaining forced
        columns are masked out. Logits are restricted to ids < `decode_vocab` (CODI: < eot, as the
        official code drops the last vocabulary row; Coconut: the whole vocabulary). Returns per row the generated ids up to and including eos (at most
        `max_new_tokens`). Hooks apply to the decode passes.

        drafts: per row, candidate decodes (token lists from the first generated token on, e.g. the
        unpatched runs' own decodes). Each pass feeds a row its last token followed by the rest of
        its first draft that agrees with everything the row has generated, and keeps the draft
        columns its greedy tokens confirm (speculative decoding with given drafts): the tokens are
        those of the one-token-per-pass decode, computed in fewer, wider passes. Without a draft
        that agrees, `lookup` guesses by n-gram lookup in the row's own decode and the drafts
        (`lookup_guess`); a row with no guess advances one token per pass.
        """
        b, n = logits.shape[:2]
        eos, device = self.eos_id, self.device
        first_col = kv_cache.previous_attention_mask.shape[1] - n  # column of the logits' first position
        greedy = logits[:, :, : self.decode_vocab].argmax(dim=-1)  # [b, n]
        if n > 1:
            agree = (greedy[:, :-1] == forced.to(device)) & (greedy[:, :-1] != eos)
            accepted = agree.long().cumprod(dim=1).sum(dim=1)
        else:
            accepted = torch.zeros(b, dtype=torch.long, device=device)
        generated = [greedy[r, : int(accepted[r]) + 1].tolist()[:max_new_tokens] for r in range(b)]
        active = [r for r in range(b) if generated[r][-1] != eos and len(generated[r]) < max_new_tokens]
        if not active:
            return [torch.tensor(g, dtype=torch.long) for g in generated]
        kv_cache = select_rows(kv_cache, torch.tensor(active, device=device))
        mask = kv_cache.previous_attention_mask.clone()
        for i, r in enumerate(active):  # the forced (and padded) columns this row did not take
            mask[i, first_col + int(accepted[r]) + 1 :] = 0
        kv_cache.previous_attention_mask = mask
        row_offsets = [offsets[r] for r in active] if offsets is not None else None
        while active:
            feeds = [draft_feed(generated[r], drafts[r] if drafts is not None else (), max_new_tokens, eos, lookup) for r in active]
            width = max(len(f) for f in feeds)
            ids = torch.full((len(active), width), eos, dtype=torch.long)
            chunk_mask = torch.zeros((len(active), width), dtype=torch.long)
            for i, f in enumerate(feeds):  # right-padded: causal attention keeps padding out of real columns
                ids[i, : len(f)] = torch.tensor(f)
                chunk_mask[i, : len(f)] = 1
            col = kv_cache.previous_attention_mask.shape[1]
            out = self.forward(self.embed(ids), kv_cache=kv_cache, attention_mask=chunk_mask, fwd_hooks=fwd_hooks, logit_positions=list(range(width)), start=col, offsets=row_offsets, greedy=True)
            nxt = out.greedy.tolist()
            mask, keep = kv_cache.previous_attention_mask.clone(), []
            for i, (r, feed) in enumerate(zip(active, feeds)):
                for j in range(len(feed)):  # the token after feed[j]; feed[j + 1] was a correct guess if equal
                    generated[r].append(nxt[i][j])
                    finished = nxt[i][j] == eos or len(generated[r]) >= max_new_tokens
                    if finished or j + 1 == len(feed) or nxt[i][j] != feed[j + 1]:
                        break
                mask[i, col + j + 1 :] = 0  # draft columns after the last confirmed one
                if not finished:
                    keep.append(i)
            kv_cache.previous_attention_mask = mask
            if len(keep) < len(active):
                active = [active[i] for i in keep]
                row_offsets = [row_offsets[i] for i in keep] if row_offsets is not None else None
                if active:
                    kv_cache = select_rows(kv_cache, torch.tensor(keep, device=device))
        return [torch.tensor(g, dtype=torch.long) for g in generated]

    def run_latents(self, questions: Sequence[str], fwd_hooks: Sequence[Hook] = ()) -> tuple[Tensor, TransformerLensKeyValueCache, list[int]]:
        """Prefill [question, suffix, bot] (left-padded) and run the latent loop, `fwd_hooks` in every pass.

        Returns (fed latents [batch, K, d_model], the KV cache after the last latent, each row's left padding).
        """
        embeds, mask, offsets = self.left_padded([self.prompt_ids(q) for q in questions])
        kv_cache = TransformerLensKeyValueCache.init_cache(self.cfg, self.device, len(questions))
        k = self.num_latents
        out = self.forward(embeds, kv_cache=kv_cache, attention_mask=mask, fwd_hooks=fwd_hooks, logit_positions=[], offsets=offsets, thoughts=k > 0)
        latents = torch.zeros(len(questions), k, self.cfg.d_model, dtype=embeds.dtype, device=self.device)
        if k > 0:
            latents[:, 0] = out.thoughts[:, -1].to(latents)

        def hooks(start: int, length: int) -> Sequence[Hook]:
            return fwd_hooks

        self.latent_steps(latents, kv_cache, 0, embeds.shape[1], hooks=hooks, offsets=offsets)
        return latents, kv_cache, offsets

    @torch.no_grad()
    def generate_batch(self, questions: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS, fwd_hooks: Sequence[Hook] = (), *, num_latents: int | None = None) -> list[Generation]:
        """The official evaluation loop for many questions at once (left padding, KV cache).

        Results equal `generate` on each question alone; hooks made with `interp.at_positions`
        act at each question's own absolute positions. `num_latents` (0 included) overrides the
        model's number of thoughts for this call.
        """
        if num_latents is not None and num_latents != self.num_latents:
            return self.with_latents(num_latents).generate_batch(questions, max_new_tokens, fwd_hooks)
        for question in questions:
            self.check_question(question, max_new_tokens=max_new_tokens)
        q_ids = [self.encode(q) for q in questions]
        latents, kv_cache, offsets = self.run_latents(questions, fwd_hooks)
        tail = self.tail_ids()[: 1 + len(self.eot_suffix_ids)]  # eot and its suffix: fed, not generated
        col = kv_cache.previous_attention_mask.shape[1]
        out = self.forward(self.embed(tail.expand(len(questions), -1)), kv_cache=kv_cache, fwd_hooks=fwd_hooks, logit_positions=[len(tail) - 1], start=col, offsets=offsets)
        answers = self.greedy_decode(out.logits, None, kv_cache, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks, offsets=offsets)
        result = []
        for ids, lat, ans in zip(q_ids, latents.cpu(), answers):
            text = self.tokenizer.decode(ans, skip_special_tokens=True)
            result.append(Generation(ids, lat, ans, text, self.extract_answer(text)))
        return result

    def generate(self, question: str, max_new_tokens: int = MAX_NEW_TOKENS, fwd_hooks: Sequence[Hook] = (), *, num_latents: int | None = None) -> Generation:
        """Greedy generation for one question, with `fwd_hooks` active in every pass (`num_latents`: as `generate_batch`)."""
        return self.generate_batch([question], max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks, num_latents=num_latents)[0]

    # ------------------------------------------------------------------ traces

    def sequence(self, question_ids: Tensor, latents: Tensor, answer_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The teacher-forced sequence [question, suffix, bot, latents, eot, suffix, prefix, (answer)].

        Returns (tokens [seq] with -1 at latent positions, input embeddings [seq, d_model]).
        """
        k = latents.shape[0]
        prompt = torch.cat([question_ids.long(), torch.tensor(self.question_suffix_ids, dtype=torch.long), torch.tensor([self.bot_id])])
        tokens = torch.cat([prompt, torch.full((k,), -1), self.tail_ids(answer_ids)])
        embeds = self.embed(tokens.clamp(min=0))
        embeds[len(prompt) : len(prompt) + k] = latents.to(embeds)
        return tokens, embeds

    def _answer_ids(self, answer: float | str | Tensor | None) -> Tensor | None:
        return answer if answer is None or isinstance(answer, Tensor) else self.answer_token_ids(answer)

    @torch.no_grad()
    def trace(
        self,
        question: str,
        answer: float | str | Tensor | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        *,
        fwd_hooks: Sequence[Hook] = (),
        names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
    ) -> Trace:
        """Free latent loop, then eot and the teacher-forced prefix, cached over the whole sequence.

        `answer` (a number, its text, or answer token ids [n]) is teacher-forced after the prefix.
        `fwd_hooks` act in the loop (the latents are those the hooked loop feeds) and in the final
        teacher-forced pass, which then reproduces the loop's activations. `names_filter` limits
        the cache as in TransformerLens's `run_with_cache`.
        """
        gen = self.generate(question, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks)
        return self.trace_from(question, gen, gen.latents, self._answer_ids(answer), fwd_hooks, names_filter=names_filter)

    def trace_from(
        self,
        question: str,
        generation: Generation,
        latents: Tensor,
        answer_ids: Tensor | None,
        fwd_hooks: Sequence[Hook] = (),
        *,
        names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
    ) -> Trace:
        """A `Trace` of one teacher-forced pass with the given latents [K, d_model] and hooks."""
        tokens, embeds = self.sequence(generation.question_ids, latents, answer_ids)
        out = self.forward(embeds[None], fwd_hooks=fwd_hooks, with_cache=True, names_filter=names_filter)
        layout = self.layout(len(generation.question_ids), 0 if answer_ids is None else len(answer_ids))
        return Trace(
            question=question,
            tokens=tokens,
            input_embeds=embeds,
            latents=latents,
            cache=out.cache,
            answer_logits=out.logits[0, layout.answer_position],
            layout=layout,
            generation=generation,
            next_logits=out.logits[0, -1],
            answer_ids=answer_ids,
        )

    @torch.no_grad()
    def run_with_cache(
        self,
        question: str,
        *,
        answer: float | str | Tensor | None = None,
        fwd_hooks: Sequence[Hook] = (),
        names_filter: Callable[[str], bool] | Sequence[str] | str | None = None,
    ) -> tuple[Tensor, ActivationCache]:
        """The real latent loop, eot and the answer prefix: (logits [1, seq, d_vocab], cache).

        As TransformerLens's `run_with_cache`, over the sequence `trace` builds; hooks (plain or
        `at_positions`) act in the loop and in the cached pass.
        """
        out = self._hooked_pass(question, answer, fwd_hooks, with_cache=True, names_filter=names_filter)
        return out.logits, out.cache

    @torch.no_grad()
    def run_with_hooks(self, question: str, fwd_hooks: Sequence[Hook] = (), *, answer: float | str | Tensor | None = None) -> Tensor:
        """The real latent loop with `fwd_hooks`, then eot and the answer prefix: logits [1, seq, d_vocab]."""
        return self._hooked_pass(question, answer, fwd_hooks).logits

    def _hooked_pass(self, question: str, answer, fwd_hooks: Sequence[Hook], **forward_kwargs) -> ForwardOutput:
        """The hooked latent loop (no decoding), then one teacher-forced pass with the same hooks over the sequence."""
        answer_ids = self._answer_ids(answer)
        self.check_question(question, 0 if answer_ids is None else len(answer_ids), max_new_tokens=0)
        latents, _, _ = self.run_latents([question], fwd_hooks)
        _, embeds = self.sequence(self.encode(question), latents[0], answer_ids)
        return self.forward(embeds[None], fwd_hooks=fwd_hooks, **forward_kwargs)

    # ------------------------------------------------------------------ latent decoding

    @torch.no_grad()
    def decode_latents(self, gen: Generation | Trace, k: int = 5) -> list[dict[str, list[tuple[str, float]]]]:
        """Top-k vocabulary tokens of each latent, as in the CODI paper's latent decoding.

        For latent t: `state` = the unembedding of the final-normed state computed at latent t's
        position (the vector the thought map turns into latent t+1); `embedding` = latent t's fed
        embedding through the unembedding. Probabilities are softmaxes over ids < `decode_vocab`.
        Positions come from the layout (question suffix included).
        """
        generation = gen.generation if isinstance(gen, Trace) else gen
        model = self.with_latents(len(generation.latents))
        _, embeds = model.sequence(generation.question_ids, generation.latents)
        out = model.forward(embeds[None])
        layout = model.layout(len(generation.question_ids))
        rows = []
        for t in range(model.num_latents):
            state_logits = out.logits[0, layout.latent(t), : self.decode_vocab]
            emb_logits = (generation.latents[t].to(self.device) @ self.model.W_U)[: self.decode_vocab]
            rows.append({"state": self._top_tokens(state_logits, k), "embedding": self._top_tokens(emb_logits, k)})
        return rows

    def _top_tokens(self, logits: Tensor, k: int) -> list[tuple[str, float]]:
        probs = logits.float().softmax(-1)
        top = probs.topk(k)
        return [(self.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
