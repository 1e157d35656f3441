"""Attribution patching (AtP) through the latent loop: every site's effect from one backward pass.

AtP (Nanda 2023; Syed et al. 2023; Kramár et al. 2024) estimates the effect of patching the clean
activation into the corrupted run at a site to first order, from the corrupted run's gradient:

    estimate(site) = (a_clean - a_corrupted) . d metric / d a          (summed over the site's last dims)

`attribute(model, traces, hooks, strategy)` returns it for every layer, position (and head, for
per-head hooks) of the given hook families at once. The corrupted run is re-run differentiably with
the real latent loop (each thought computed from the state before it, as an iterative patch does);
a zero tensor `delta` that requires grad is added at every hook point of every forward chunk, so
`d metric / d delta` is the gradient at that activation. Nothing else changes: parameters keep their
`requires_grad` (gradients are taken with `torch.autograd.grad` with respect to the deltas only, so
no `.grad` is ever written), and the model runs in no-grad everywhere else.

The three strategies of the exact engine (`interp.engine`) are three gradient paths. With x_q the
input fed at position q (for a latent, x_q = T(h_{q-1}): the thought map T of the final-normed
state at the position before; `hook_thought` at q-1 is T's output) and a_p a site at position p:

- parallel: the fed thoughts held at the corrupted run's (constants). One teacher-forced forward
  pass over the whole corrupted sequence, one backward: d metric / d a_p with every x fixed; the
  patch reaches later positions only through attention (keys and values of p). `hook_thought`
  sites are 0 here (the thought made is not fed).
- iterative: the total derivative through the thought map. The loop is run as the engine runs it
  (the prompt in one pass, one pass per latent over a KV cache whose keys and values keep their
  autograd graph, then the teacher-forced tail), with x_{t+1} = T(h_t) live, and one backward.
  Positions after the last fed thought (the last latent, eot, the answer) get the parallel value.
- feedback: the part that leaves the site's position only through that position's own thought.
  The exact engine runs the site's position twice: patched on a frozen cache (its state mapped into
  the next thought) and unpatched (what later positions attend to). Its derivative is
  J_p^T g_p, where g_p = d metric / d (thought made at p) along every path after it (the total
  derivative, read at `hook_thought` in the iterative pass) and J_p = d thought_p / d a_p within
  position p's own column: p's later layers, including p attending to its own keys and values, with
  the earlier positions' keys and values and p's fed input held constant. It is computed by a second,
  column-local pass over the positions whose thought is fed: every such position p is one batch row
  that feeds x_p (detached) over a copy of the iterative pass's KV cache with the graph cut
  (`detach`) and the columns >= p masked out, so the only gradient path from a site at p is into
  thought_p; the scalar sum_p thought_p . g_p (g detached) is backpropagated once. Cost: the
  iterative pass, one batched single-position pass, two backward passes.
  Where it is defined: at every position whose thought is fed (bot, latent[0]..latent[K-2]);
  everywhere else no thought-map path leaves the position (question tokens reach bot only through
  attention; the last latent's thought is not fed; eot and the answer have no thought map after
  them), so the feedback derivative is exactly 0 there and is reported as 0. The exact engine
  refuses feedback outside latent positions, so bot's value (the path into latent[0], a well-
  defined derivative) has no exact counterpart: `verify_top_k` reports NaN there.

To first order the iterative effect splits exactly into three parts (`decompose` reports them):

    iterative = parallel + feedback + remainder

the remainder being the paths that leave the site through attention (p's keys and values read by a
later position q) and re-enter the loop through a later position's thought map:
remainder(a_p) = sum_{q > p} (d thought_q / d a_p, thoughts held)^T g_q. (Proof: with x = A x + B a
the loop and M(x, a) the metric, dM/da = M_a + g^T B with g = M_x (I - A)^{-1} = d metric / d thought;
B splits into p's own column (feedback) and the columns q > p it reaches by attention (remainder).)

AtP* (Kramár et al. 2024) options:

- `grad_drop=True` (GradDrop, their section 3.1.2): AtP can miss a site whose effect cancels
  between paths (the gradient sums a large positive and a large negative path). For each layer l,
  the estimate is recomputed with the gradient through layer l's residual contribution (its
  `hook_attn_out` and `hook_mlp_out`, at every position and in every pass) set to zero; the
  column `grad_drop` is (1 / (L - 1)) sum_l |estimate_l|, a magnitude for ranking sites (it is not
  a signed effect). It matters when a component's effect is a sum of paths of opposite signs
  (backup heads, self-repair); it costs L backward passes.
- `qk_fix=True` (their section 3.1.1): AtP linearizes the attention softmax, which is badly wrong
  where the pattern saturates (a patched query or key moves attention from ~0 to ~1, where the
  gradient of the softmax is ~0). For query and key sites (`q`, `k`: `attn.hook_q`, `attn.hook_k`)
  the change of the attention pattern is computed exactly (the softmax recomputed with the clean
  query of that row, or with the clean key's scores in that column for every query after it), then
  multiplied with the gradient at the pattern (`hook_pattern`): exact up to the pattern, linear
  after it. The column `qk_fix` holds it for q/k sites (NaN for others). It matters for q/k sites
  of heads whose patterns are sharp; for other sites it changes nothing.

Metrics (`metric=`): "logit_diff" (the clean answer's token minus the corrupted answer's token at
the last teacher-forced position, the answers' first differing token, as `PairTraces` scores it),
"normalized_effect" (that, minus the corrupted run's, over clean minus corrupted), "kl"
(KL(clean || patched) at that position, as `interp.score` reports it), or a callable
`fn(logits [d_vocab]) -> scalar tensor` of the patched run's logits at that position
(`PatchResult.next_logits`). An estimate is of metric(patched) - metric(corrupted run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from interp.engine import STRATEGIES, BatchPatcher, Job, PatchError, Site, Strategy, check_hook
from interp.hooks import HEAD_HOOKS, Hook, layer_of
from interp.model import LatentModel
from interp.trace import PairTraces

__all__ = ["FAMILIES", "Verification", "attribute", "decompose", "exact_effects", "resolve_hooks", "verify_top_k"]

#: short family names -> the hook suffix in every block
BLOCK_FAMILIES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "result": "attn.hook_result",
    "mlp_post": "mlp.hook_post",
}
#: short names of the thought map's hook points (outside the blocks)
THOUGHT_HOOKS = {"thought": "hook_thought", "prj_in": "prj.hook_in", "prj_hidden": "prj.hook_hidden"}
FAMILIES = (*BLOCK_FAMILIES, *THOUGHT_HOOKS)
Metric = str | Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- hooks


def resolve_hooks(model: LatentModel, hooks: str | Sequence[str]) -> list[str]:
    """Hook names from families (`resid_post`, `z`, `thought`, ... or their suffixes `hook_resid_post`,
    `attn.hook_z`: every block) and full names (`blocks.3.hook_resid_post`, `hook_thought`), in order."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks:
        raise PatchError("no hooks to attribute")
    names: list[str] = []
    suffixes = {v: v for v in BLOCK_FAMILIES.values()} | {v.removeprefix("attn.").removeprefix("mlp."): v for v in BLOCK_FAMILIES.values()}
    for h in hooks:
        if not isinstance(h, str):
            raise PatchError(f"a hook is a family name ({', '.join(FAMILIES)}) or a TransformerLens hook name, not {h!r}")
        if h in model.model.hook_dict:
            found = [h]
        elif h in THOUGHT_HOOKS:
            found = [THOUGHT_HOOKS[h]]
        elif h in BLOCK_FAMILIES or h in suffixes:
            suffix = BLOCK_FAMILIES.get(h) or suffixes[h]
            found = [f"blocks.{layer}.{suffix}" for layer in range(model.cfg.n_layers)]
        else:
            raise PatchError(f"unknown hook or family {h!r}; families are {', '.join(FAMILIES)}, or give a hook name such as blocks.0.hook_resid_post")
        for name in found:
            check_hook(model, name)
            if name.endswith("hook_pattern") or name.endswith("hook_attn_scores"):
                raise PatchError(f"{name!r} is not a per-position activation")
            if name not in names:
                names.append(name)
    return names


# ----------------------------------------------------------------------------- taps and gates


@dataclass
class _Taps:
    """Zero deltas added at hook points: d metric / d delta is the gradient at the activation.

    Each forward chunk's hook call records (positions [rows, len], key positions, the activation,
    its delta); `gather` lays the activations or per-delta gradients out over the sequence:
    [seq, ...] for per-position hooks, [heads, seq, seq] (query, key) for `hook_pattern`.
    """

    names: Sequence[str]
    seq_len: int
    gate: _DropState | None = None
    records: dict[str, list[tuple[Tensor, Tensor | None, Tensor, Tensor]]] = field(default_factory=dict)

    def hooks(self, positions: Sequence[Sequence[int]] | int, keys: Tensor | None = None) -> list[Hook]:
        """Hooks for a chunk: `positions[r]` the absolute positions of row r's columns (an int: one
        row whose columns start there). `keys` [rows, key columns]: the position of each attention
        key column (-1: masked, not a position); default: column i is position i."""

        def tap(act: Tensor, hook) -> Tensor:
            pos = torch.tensor(positions, dtype=torch.long) if not isinstance(positions, int) else torch.arange(positions, positions + act.shape[1])[None]
            kpos = None
            if hook.name.endswith("hook_pattern"):
                pos = torch.tensor(positions, dtype=torch.long) if not isinstance(positions, int) else torch.arange(positions, positions + act.shape[2])[None]
                kpos = keys if keys is not None else torch.arange(act.shape[3])[None].expand(act.shape[0], -1)
            delta = torch.zeros_like(act, requires_grad=True)
            self.records.setdefault(hook.name, []).append((pos, kpos, act.detach(), delta))
            return act + delta

        hooks = [(name, tap) for name in self.names]
        if self.gate is not None:
            hooks += self.gate.hooks()
        return hooks

    def deltas(self) -> list[Tensor]:
        return [rec[3] for recs in self.records.values() for rec in recs]

    def fired(self) -> set[str]:
        return set(self.records)

    def gather(self, name: str, values: Sequence[Tensor | None] | None = None) -> Tensor | None:
        """The recorded activations (values None) or the given per-delta tensors (in `deltas()` order
        restricted to `name`; None = zeros) over the sequence; None if the hook never ran."""
        recs = self.records.get(name)
        if not recs:
            return None
        like = recs[0][2]
        if recs[0][1] is not None:  # an attention pattern [rows, heads, queries, keys] -> [heads, seq, seq]
            out = torch.zeros((like.shape[1], self.seq_len, self.seq_len), dtype=like.dtype, device=like.device)
            for i, (pos, kpos, act, _) in enumerate(recs):
                v = act if values is None else values[i]
                if v is None:
                    continue
                for r in range(v.shape[0]):
                    valid = (kpos[r] >= 0).nonzero().flatten()
                    for j, p in enumerate(pos[r].tolist()):
                        out[:, p, kpos[r][valid].to(out.device)] = v[r, :, j, valid.to(v.device)].to(out)
            return out
        out = torch.zeros((self.seq_len, *like.shape[2:]), dtype=like.dtype, device=like.device)
        for i, (pos, _, act, _) in enumerate(recs):
            v = act if values is None else values[i]
            if v is not None:
                out[pos.flatten().to(out.device)] = v.reshape(-1, *v.shape[2:]).to(out)
        return out


@dataclass
class _DropState:
    """GradDrop: layer whose residual contribution (attn_out, mlp_out) passes no gradient (None: none)."""

    n_layers: int
    drop: int | None = None

    def hooks(self) -> list[Hook]:
        state = self

        def gate(act: Tensor, hook) -> Tensor:
            return _Gate.apply(act, layer_of(hook.name), state)

        return [(f"blocks.{layer}.{h}", gate) for layer in range(self.n_layers) for h in ("hook_attn_out", "hook_mlp_out")]


class _Gate(torch.autograd.Function):
    """Identity forward; backward passes zero when its layer is the one being dropped."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: int, state: _DropState) -> Tensor:
        ctx.layer, ctx.state = layer, state
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (torch.zeros_like(grad) if ctx.state.drop == ctx.layer else grad), None, None


def _grads(scalar: Tensor, taps: _Taps, retain: bool = False) -> dict[str, list[Tensor | None]]:
    """d scalar / d delta for every delta of `taps`, grouped by hook name."""
    deltas = taps.deltas()
    if not deltas or not scalar.requires_grad:
        return {name: [None] * len(recs) for name, recs in taps.records.items()}
    flat = list(torch.autograd.grad(scalar, deltas, retain_graph=retain, allow_unused=True))
    out: dict[str, list[Tensor | None]] = {}
    for name, recs in taps.records.items():
        out[name], flat = flat[: len(recs)], flat[len(recs) :]
    return out


# ----------------------------------------------------------------------------- metrics


def _metric_fn(metric: Metric, pt: PairTraces) -> Callable[[Tensor], Tensor]:
    """metric(next_logits [d_vocab]) -> scalar tensor."""
    clean_token, corrupted_token = pt.clean_token, pt.corrupted_token
    if callable(metric):
        return metric
    if metric == "logit_diff":
        return lambda logits: logits[clean_token] - logits[corrupted_token]
    if metric == "normalized_effect":
        clean, corrupted = pt.clean_logit_diff, pt.corrupted_logit_diff
        denom = clean - corrupted
        if abs(denom) < 1e-6:
            return lambda logits: (logits[clean_token] - logits[corrupted_token]) * math.nan
        return lambda logits: (logits[clean_token] - logits[corrupted_token] - corrupted) / denom
    if metric == "kl":
        p = pt.clean.next_logits.detach().double().log_softmax(-1)
        return lambda logits: (p.exp() * (p - logits.double().log_softmax(-1).to(p.device))).sum()
    raise PatchError(f"unknown metric {metric!r}; use logit_diff, normalized_effect, kl or a function of the logits")


# ----------------------------------------------------------------------------- the passes


@dataclass
class _Pass:
    """One differentiable run: its taps, metric value, and (for the loop) the KV cache and fed inputs."""

    taps: _Taps
    value: Tensor
    cache: TransformerLensKeyValueCache | None = None
    fed: dict[int, Tensor] = field(default_factory=dict)


def _fed_positions(pt: PairTraces) -> list[int]:
    """Positions whose thought is fed: bot, latent[0] .. latent[K-2]."""
    layout = pt.corrupted.layout
    k = layout.num_latents
    return [layout.bot, *layout.latent_positions[: k - 1]] if k > 0 else []


def _parallel_pass(model: LatentModel, pt: PairTraces, names: Sequence[str], metric: Callable, gate: _DropState | None) -> _Pass:
    """The corrupted sequence in one pass, its fed inputs constants."""
    c = pt.corrupted
    taps = _Taps(names, c.seq_len, gate)
    thoughts = any(n in THOUGHT_HOOKS.values() for n in names)
    out = model.forward(c.input_embeds[None].to(model.device), fwd_hooks=taps.hooks(0), logit_positions=[c.seq_len - 1], thoughts=thoughts)
    return _Pass(taps, metric(out.logits[0, -1]))


def _loop_pass(model: LatentModel, pt: PairTraces, names: Sequence[str], metric: Callable, gate: _DropState | None, all_thoughts: bool) -> _Pass:
    """The corrupted run's real latent loop with gradients: prompt, one pass per latent (x_{t+1} = T(h_t),
    live), the teacher-forced tail; the KV cache keeps the graph. `all_thoughts`: run the thought map in
    every chunk (so that `hook_thought` fires at every position), not only where a thought is fed."""
    c = pt.corrupted
    layout = c.layout
    n_prompt, k, eot, seq = layout.n_prompt, layout.num_latents, layout.eot, c.seq_len
    embeds = c.input_embeds[None].to(model.device)
    taps = _Taps(names, seq, gate)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.device, 1)
    fed: dict[int, Tensor] = {layout.bot: embeds[:, layout.bot : layout.bot + 1]}
    out = model.forward(embeds[:, :n_prompt], kv_cache=cache, fwd_hooks=taps.hooks(0), logit_positions=[], thoughts=k > 0 or all_thoughts)
    for t in range(k):
        x = out.thoughts[:, -1:]
        col = n_prompt + t
        fed[col] = x
        out = model.forward(x, kv_cache=cache, fwd_hooks=taps.hooks(col), logit_positions=[], start=col, thoughts=t + 1 < k or all_thoughts)
    out = model.forward(embeds[:, eot:], kv_cache=cache, fwd_hooks=taps.hooks(eot), logit_positions=[seq - 1 - eot], start=eot, thoughts=all_thoughts)
    return _Pass(taps, metric(out.logits[0, -1]), cache, fed)


def _column_pass(model: LatentModel, pt: PairTraces, names: Sequence[str], loop: _Pass, gate: _DropState | None) -> tuple[_Taps, Tensor]:
    """Every position p whose thought is fed, alone in its column: one batch row per p feeding x_p
    (detached) over the loop's keys and values (detached) of positions < p. Returns the taps and the
    thoughts made [rows, d_model]; a site at p reaches nothing but thought_p."""
    positions = _fed_positions(pt)
    width = max(positions)
    rows = len(positions)
    entries = [type(e)(e.past_keys[:, :width].detach().expand(rows, -1, -1, -1), e.past_values[:, :width].detach().expand(rows, -1, -1, -1)) for e in loop.cache.entries]
    mask = torch.zeros((rows, width), dtype=torch.long, device=model.device)
    for r, p in enumerate(positions):
        mask[r, :p] = 1
    cache = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask)
    x = torch.cat([loop.fed[p].detach() for p in positions])  # [rows, 1, d]
    keys = torch.full((rows, width + 1), -1, dtype=torch.long)  # key column -> position (patterns): the cache's < p, then p itself
    for r, p in enumerate(positions):
        keys[r, :p] = torch.arange(p)
        keys[r, width] = p
    taps = _Taps(names, pt.corrupted.seq_len, gate)
    out = model.forward(x, kv_cache=cache, fwd_hooks=taps.hooks([[p] for p in positions], keys), logit_positions=[], start=width, thoughts=True)
    return taps, out.thoughts[:, -1]


# ----------------------------------------------------------------------------- estimates


def _clean_activations(model: LatentModel, pt: PairTraces, names: Sequence[str]) -> dict[str, Tensor]:
    """The clean run's activation [seq, ...] at every hook (from its trace's cache, else one pass)."""
    cache = pt.clean.cache
    out = {n: cache[n][0] for n in names if n in cache.cache_dict}
    missing = [n for n in names if n not in out]
    if missing:
        with torch.no_grad():
            extra = model.forward(pt.clean.input_embeds[None].to(model.device), with_cache=True, names_filter=missing).cache
        out |= {n: extra[n][0] for n in missing if n in extra.cache_dict}
    return out


def _estimate(diff: Tensor, grad: Tensor | None, head: bool) -> Tensor:
    """(clean - corrupted) . grad over the activation's last dims: [seq] or [seq, heads]."""
    if grad is None:
        grad = torch.zeros_like(diff)
    prod = diff.double() * grad.double().to(diff.device)
    return prod.flatten(2).sum(-1) if head else prod.flatten(1).sum(-1)


class _PairAttribution:
    """Every requested strategy's gradients for one pair, and the corrupted activations they multiply.

    With `grad_drop`, every backward pass is repeated with each layer's residual contribution passing
    no gradient: results are keyed by the dropped layer (None: nothing dropped).
    """

    def __init__(self, model: LatentModel, pt: PairTraces, names: Sequence[str], metric: Metric, grad_drop: bool, patterns: Sequence[str] = ()):
        self.model, self.pt, self.names = model, pt, list(names)
        self.patterns = list(patterns)  # hook_pattern names whose gradient is wanted too (the QK fix)
        self.metric = _metric_fn(metric, pt)
        self.gate = _DropState(model.cfg.n_layers) if grad_drop else None
        self.layers: list[int | None] = [None] + (list(range(model.cfg.n_layers)) if grad_drop else [])
        self.corrupted: dict[str, Tensor] = {}

    def _check_fired(self, taps: _Taps) -> None:
        missing = [n for n in taps.names if n not in taps.fired() and not (n == THOUGHT_HOOKS["thought"] and not _fed_positions(self.pt))]
        if missing:
            raise PatchError(f"hook {missing[0]!r} never runs in this model's forward pass (e.g. attn.hook_result needs cfg.use_attn_result); nothing to attribute there")

    def _keep_activations(self, taps: _Taps) -> None:
        for n in self.names:
            if n not in self.corrupted:
                self.corrupted[n] = taps.gather(n)

    def run(self, strategies: Sequence[str]) -> dict[str, dict[int | None, dict[str, Tensor]]]:
        """{strategy: {dropped layer: {hook: gradient [seq, ...]}}}; fills `self.corrupted` [seq, ...]."""
        pt, names = self.pt, self.names + self.patterns
        thought = THOUGHT_HOOKS["thought"]
        result: dict[str, dict[int | None, dict[str, Tensor]]] = {}
        with torch.enable_grad():
            if "parallel" in strategies:
                par = _parallel_pass(self.model, pt, names, self.metric, self.gate)
                self._check_fired(par.taps)
                self._keep_activations(par.taps)
                result["parallel"] = self._backward(par.value, par.taps)
            if "iterative" in strategies or "feedback" in strategies:
                iterative = "iterative" in strategies
                needs_g = "feedback" in strategies and bool(_fed_positions(pt))  # d metric / d thought, for feedback
                loop_names = list(dict.fromkeys([*(names if iterative else []), *([thought] if needs_g else [])]))
                loop = _loop_pass(self.model, pt, loop_names, self.metric, self.gate, all_thoughts=any(n in THOUGHT_HOOKS.values() for n in names))
                if iterative:
                    self._check_fired(loop.taps)
                    self._keep_activations(loop.taps)
                grads = self._backward(loop.value, loop.taps)
                if iterative:
                    result["iterative"] = {layer: {n: g[n] for n in names} for layer, g in grads.items()}
                if "feedback" in strategies:
                    result["feedback"] = self._feedback(loop, {layer: g.get(thought) for layer, g in grads.items()})
        return result

    def _backward(self, value: Tensor, taps: _Taps) -> dict[int | None, dict[str, Tensor]]:
        out = {}
        for i, layer in enumerate(self.layers):
            if self.gate is not None:
                self.gate.drop = layer
            grads = _grads(value, taps, retain=i + 1 < len(self.layers))
            out[layer] = {n: taps.gather(n, grads[n]) if n in grads else None for n in taps.names}
        if self.gate is not None:
            self.gate.drop = None
        return out

    def _feedback(self, loop: _Pass, g_thought: dict[int | None, Tensor | None]) -> dict[int | None, dict[str, Tensor]]:
        """J_p^T g_p at the positions p whose thought is fed (0 elsewhere), per dropped layer;
        g_thought[layer] [seq, d_model]: d metric / d (thought made at each position), every path after it."""
        positions = _fed_positions(self.pt)
        if not positions:
            for n in self.names:
                self.corrupted.setdefault(n, None)
            return {layer: {n: None for n in self.names + self.patterns} for layer in self.layers}
        taps, thoughts = _column_pass(self.model, self.pt, self.names + self.patterns, loop, self.gate)
        self._check_fired(taps)
        self._keep_activations(taps)  # at the fed positions (what the estimate multiplies; 0 elsewhere)
        out = {}
        for i, layer in enumerate(self.layers):
            g = g_thought[layer]
            if g is None:
                g = torch.zeros((self.pt.corrupted.seq_len, thoughts.shape[-1]), dtype=thoughts.dtype, device=thoughts.device)
            scalar = (thoughts * g[positions].to(thoughts).detach()).sum()
            if self.gate is not None:
                self.gate.drop = layer
            per = _grads(scalar, taps, retain=i + 1 < len(self.layers))
            out[layer] = {n: taps.gather(n, per[n]) for n in self.names + self.patterns}
        if self.gate is not None:
            self.gate.drop = None
        return out


def _pairs(traces: PairTraces | Sequence[PairTraces]) -> list[PairTraces]:
    pts = [traces] if isinstance(traces, PairTraces) else list(traces) if isinstance(traces, (list, tuple)) else None
    if not pts or not all(isinstance(p, PairTraces) for p in pts):
        raise PatchError("traces must be a PairTraces (interp.trace_pair) or a non-empty list of them")
    return pts


def _frame(model: LatentModel, pt_index: int, pt: PairTraces, names: Sequence[str], columns: dict[str, dict[str, Tensor]]) -> pd.DataFrame:
    """Rows (pair, hook, layer, position, head) with one column per entry of `columns` ({column: {hook: [seq(, heads)]}})."""
    names_at = pt.corrupted.layout.names
    parts = []
    for name in names:
        first = next(iter(columns.values()))[name]
        seq = first.shape[0]
        heads = first.shape[1] if first.dim() == 2 else None
        pos = torch.arange(seq).repeat_interleave(heads) if heads else torch.arange(seq)
        frame = {
            "pair": pt_index,
            "hook": name,
            "layer": pd.array([layer_of(name)] * len(pos), dtype="Int64"),
            "position": [names_at[p] for p in pos.tolist()],
            "head": pd.array(torch.arange(heads).repeat(seq).tolist() if heads else [None] * len(pos), dtype="Int64"),
        }
        for col, values in columns.items():
            frame[col] = values[name].reshape(-1).cpu().double().numpy()
        parts.append(pd.DataFrame(frame))
    return pd.concat(parts, ignore_index=True)


def _qk_layers(names: Sequence[str]) -> list[int]:
    return sorted({layer_of(n) for n in names if n.endswith(("attn.hook_q", "attn.hook_k"))})


def _check_qk_fix(model: LatentModel) -> None:
    cfg = model.cfg
    unsupported = [
        (cfg.positional_embedding_type not in ("rotary", "standard"), f"positional embeddings {cfg.positional_embedding_type!r}"),
        (bool(getattr(cfg, "use_logn_attn", False)), "log-n attention scaling"),
        (bool(getattr(cfg, "use_attention_sinks", False)), "attention sinks"),
        (bool(getattr(cfg, "use_qk_norm", False)) and cfg.positional_embedding_type != "rotary", "q/k norms without rotary"),
    ]
    for bad, what in unsupported:
        if bad:
            raise PatchError(f"qk_fix does not support {what}")


def _trace_activation(model: LatentModel, trace, name: str) -> Tensor:
    """One hook's activation [seq, ...] in a trace's teacher-forced pass (its cache, else one pass)."""
    if name in trace.cache.cache_dict:
        return trace.cache[name][0]
    with torch.no_grad():
        return model.forward(trace.input_embeds[None].to(model.device), with_cache=True, names_filter=[name]).cache[name][0]


def _qk_estimates(model: LatentModel, pt: PairTraces, names: Sequence[str], strategy: str, grads: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """AtP* QK fix for q/k sites: the exact change of the attention pattern times d metric / d pattern.

    q at (t, h): row t of head h recomputed with the clean (rotated) query. k at (s, kv head): for
    every query t >= s (feedback: t = s only, later positions attend to the unpatched key) of every
    query head of the group, the row with column s's score moved to the clean key's; with A the
    pattern, G its gradient, S_t = sum_j A_tj G_tj and e = exp(delta_ts) - 1, the row's contribution is
    (S_t + A_ts e G_ts) / (1 + A_ts e) - S_t (a softmax with one logit shifted, exactly).
    """
    rotary = model.cfg.positional_embedding_type == "rotary"
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for layer in _qk_layers(names):
            attn = model.model.blocks[layer].attn
            q_name, k_name = (f"blocks.{layer}.attn.hook_rot_q", f"blocks.{layer}.attn.hook_rot_k") if rotary else (f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k")
            q_bad, k_bad = (_trace_activation(model, pt.corrupted, n)[None] for n in (q_name, k_name))
            q_good, k_good = (_trace_activation(model, pt.clean, n)[None].to(q_bad) for n in (q_name, k_name))
            seq = q_bad.shape[1]
            causal = torch.ones(seq, seq, dtype=torch.bool, device=q_bad.device).tril()

            def scores(q: Tensor, k: Tensor, attn=attn, causal=causal) -> Tensor:
                return attn.calculate_attention_scores(q, k)[0].double().masked_fill(~causal, -math.inf)  # [heads, seq, seq]

            base = scores(q_bad, k_bad)
            a = base.softmax(-1)
            g = grads.get(f"blocks.{layer}.attn.hook_pattern")
            g = torch.zeros_like(a) if g is None else g.double().to(a.device)
            s_row = (a * g).sum(-1)  # [heads, seq]
            for name in names:
                if layer_of(name) != layer:
                    continue
                if name.endswith("attn.hook_q"):
                    delta_a = scores(q_good, k_bad).softmax(-1) - a
                    out[name] = (delta_a * g).sum(-1).T.contiguous()  # [seq, heads]
                elif name.endswith("attn.hook_k"):
                    shift = (scores(q_bad, k_good) - base).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # [heads, t, s]; 0 where masked
                    e = shift.exp() - 1
                    z = 1 + a * e
                    term = (s_row[:, :, None] + a * e * g) / z - s_row[:, :, None]  # [heads, t, s]
                    if strategy == "feedback":
                        term = term * torch.eye(seq, dtype=term.dtype, device=term.device)
                    per_head = term.sum(1).T  # [s, heads]
                    n_kv = k_bad.shape[2]
                    out[name] = per_head.reshape(seq, n_kv, -1).sum(-1).contiguous()  # query heads h -> kv head h // group
    return out


def _estimates(model: LatentModel, pt: PairTraces, names: Sequence[str], strategies: Sequence[str], metric: Metric, grad_drop: bool, qk_fix: bool = False):
    """{strategy: {hook: estimate [seq(, heads)]}}; with grad_drop, {strategy: {hook: GradDrop score}}
    (else None); with qk_fix, {strategy: {hook: QK-fixed estimate, NaN for sites other than q/k}} (else None)."""
    patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in _qk_layers(names)] if qk_fix else []
    if qk_fix:
        _check_qk_fix(model)
    job = _PairAttribution(model, pt, names, metric, grad_drop, patterns)
    grads = job.run(strategies)
    clean = _clean_activations(model, pt, names)
    diffs = {}
    for n in names:
        corrupted = job.corrupted[n]
        diffs[n] = None if corrupted is None else clean[n].to(corrupted) - corrupted
    heads = {n: n.endswith(HEAD_HOOKS) for n in names}

    def estimate(n: str, grad: Tensor | None) -> Tensor:
        if diffs[n] is None:  # no position whose thought is fed (no latents): feedback is 0 everywhere
            shape = clean[n].shape[:2] if heads[n] else clean[n].shape[:1]
            return torch.zeros(shape, dtype=torch.float64)
        return _estimate(diffs[n], grad, heads[n])

    est = {s: {n: estimate(n, grads[s][None][n]) for n in names} for s in strategies}
    dropped = None
    if grad_drop:
        n_layers = model.cfg.n_layers
        dropped = {s: {n: sum(estimate(n, grads[s][layer][n]).abs() for layer in range(n_layers)) / max(1, n_layers - 1) for n in names} for s in strategies}
    fixed = None
    if qk_fix:
        fixed = {}
        for s in strategies:
            qk = _qk_estimates(model, pt, names, s, grads[s][None])
            fixed[s] = {n: qk[n].cpu() if n in qk else torch.full_like(est[s][n], math.nan) for n in names}
    return est, dropped, fixed


# ----------------------------------------------------------------------------- public


def attribute(
    model: LatentModel,
    traces: PairTraces | Sequence[PairTraces],
    hooks: str | Sequence[str],
    strategy: Strategy = "iterative",
    *,
    metric: Metric = "logit_diff",
    grad_drop: bool = False,
    qk_fix: bool = False,
) -> pd.DataFrame:
    """AtP estimates of patching the clean activation into the corrupted run, at every site.

    hooks: families (`resid_pre`, `resid_mid`, `resid_post`, `attn_out`, `mlp_out`, `z` (per head),
    `q`/`k`/`v` (per head), `thought` (`hook_thought`), `prj_in`, `prj_hidden` (CODI)) or hook names.
    strategy: "parallel", "iterative" or "feedback" (the three gradient paths of the module docstring).
    metric: "logit_diff", "normalized_effect", "kl" or a callable of the logits [d_vocab] at the
    scored position. Returns a DataFrame with one row per (pair, hook, position[, head]): columns
    pair (index into `traces`), hook, layer (None outside the blocks), position (the layout's name:
    q[3], bot, latent[2], eot, prefix[0], answer[0]), head (None where the hook has none) and
    estimate (of metric(patched) - metric(corrupted)); with `grad_drop`, also `grad_drop` (AtP*
    GradDrop magnitude); with `qk_fix`, also `qk_fix` (q/k sites with the exact attention pattern;
    NaN elsewhere). `df.attrs` records strategy and metric.
    """
    if strategy not in STRATEGIES:
        raise PatchError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    names = resolve_hooks(model, hooks)
    frames = []
    for i, pt in enumerate(_pairs(traces)):
        est, dropped, fixed = _estimates(model, pt, names, [strategy], metric, grad_drop, qk_fix)
        columns = {"estimate": est[strategy]}
        if dropped is not None:
            columns["grad_drop"] = dropped[strategy]
        if fixed is not None:
            columns["qk_fix"] = fixed[strategy]
        frames.append(_frame(model, i, pt, names, columns))
    df = pd.concat(frames, ignore_index=True)
    df.attrs.update(strategy=strategy, metric=metric)
    return df


def decompose(
    model: LatentModel,
    traces: PairTraces | Sequence[PairTraces],
    hooks: str | Sequence[str],
    *,
    metric: Metric = "logit_diff",
) -> pd.DataFrame:
    """Every site's AtP estimate on the three paths and the remainder: columns parallel, feedback,
    remainder, iterative (with iterative = parallel + feedback + remainder; the remainder is the paths
    that leave the site through attention and re-enter the loop through a later thought map), keyed as
    `attribute`'s rows. Runs the parallel pass, the loop pass and the column-local pass once each."""
    names = resolve_hooks(model, hooks)
    frames = []
    for i, pt in enumerate(_pairs(traces)):
        est, _, _ = _estimates(model, pt, names, list(STRATEGIES), metric, False)
        rem = {n: est["iterative"][n] - est["parallel"][n] - est["feedback"][n] for n in names}
        frames.append(_frame(model, i, pt, names, {"parallel": est["parallel"], "feedback": est["feedback"], "remainder": rem, "iterative": est["iterative"]}))
    df = pd.concat(frames, ignore_index=True)
    df.attrs.update(metric=metric)
    return df


# ----------------------------------------------------------------------------- verification


@dataclass
class Verification:
    """AtP estimates next to exact patches: `table` (the verified rows of the estimates, with
    `exact`), Spearman's rank correlation of the two, and the fraction of the exact top sites
    (by |exact|, as many as `recall_k`) that are among AtP's top ones in the table."""

    table: pd.DataFrame
    spearman: float
    recall: float
    recall_k: int


def exact_effects(
    model: LatentModel,
    traces: PairTraces | Sequence[PairTraces],
    rows: pd.DataFrame,
    strategy: Strategy,
    *,
    metric: Metric = "logit_diff",
    batch_size: int | None = None,
) -> list[float]:
    """metric(patched) - metric(corrupted) of the exact engine's clean patch at each row's site
    (pair, hook, position, head); NaN where the engine refuses the site (feedback outside latents)."""
    pts = _pairs(traces)
    jobs, keep = [], []
    for r in rows.itertuples(index=False):
        pt = pts[int(r.pair)]
        p = pt.corrupted.layout.names.index(r.position)
        head = None if pd.isna(r.head) else int(r.head)
        if strategy == "feedback" and p not in pt.corrupted.latent_positions:
            keep.append(None)
            continue
        keep.append(len(jobs))
        jobs.append(Job((Site(r.hook, (p,), head),), strategy, pair=int(r.pair)))
    patcher = BatchPatcher(model, [(pt.corrupted, pt.clean) for pt in pts], batch_size=batch_size, decode=False)
    results = patcher.run(jobs) if jobs else []
    fns = [_metric_fn(metric, pt) for pt in pts]
    out = []
    with torch.no_grad():
        for r, j in zip(rows.itertuples(index=False), keep):
            if j is None:
                out.append(math.nan)
                continue
            pair = int(r.pair)
            base = fns[pair](pts[pair].corrupted.next_logits)
            out.append(float(fns[pair](results[j].next_logits) - base))
    return out


def verify_top_k(
    model: LatentModel,
    traces: PairTraces | Sequence[PairTraces],
    estimates: pd.DataFrame,
    k: int = 20,
    *,
    column: str = "estimate",
    strategy: Strategy | None = None,
    metric: Metric | None = None,
    extra: int = 0,
    recall_k: int = 10,
    seed: int = 0,
) -> Verification:
    """Exact patches (the engine, clean patch, one site each) of the top-`k` sites by |estimate|
    (`column`: estimate, or grad_drop / qk_fix) plus `extra` random other sites, side by side with
    the estimates: Spearman's rank correlation over them and the recall of the exact top `recall_k`
    among AtP's top `recall_k` (both over the verified sites only). `strategy` and `metric` default
    to the ones `attribute` recorded in `estimates.attrs`."""
    strategy = strategy or estimates.attrs.get("strategy")
    if strategy not in STRATEGIES:
        raise PatchError(f"say which strategy the estimates are for (strategy=...): got {strategy!r}")
    metric = metric if metric is not None else estimates.attrs.get("metric", "logit_diff")
    ranked = estimates.assign(_abs=estimates[column].abs()).sort_values("_abs", ascending=False, kind="stable")
    top = ranked.head(k)
    rest = ranked.iloc[k:]
    if extra > 0 and len(rest):
        top = pd.concat([top, rest.sample(n=min(extra, len(rest)), random_state=seed)])
    table = top.drop(columns="_abs").copy()
    table["exact"] = exact_effects(model, traces, table, strategy, metric=metric)
    valid = table.dropna(subset=["exact", column])
    rho = _spearman(valid[column].to_numpy(), valid["exact"].to_numpy())
    n = min(recall_k, len(valid))
    if n:
        by_exact = set(valid["exact"].abs().nlargest(n).index)
        by_atp = set(valid[column].abs().nlargest(n).index)
        recall = len(by_exact & by_atp) / n
    else:
        recall = math.nan
    return Verification(table.reset_index(drop=True), rho, recall, n)


def _spearman(a, b) -> float:
    if len(a) < 2:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)
