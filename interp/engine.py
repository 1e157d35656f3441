"""The patching engine: batched patched runs of CODI's latent loop, interventions as data.

A `Job` is one patched run: sites (`Site(hook, positions, head)`: where), an `Intervention` (what
is written, `interp.interventions`) and a strategy (which paths the written value may take):

- parallel: one pass over the corrupted sequence with its latent inputs held at the corrupted
  run's own latents. The patched activation reaches later positions only through attention.
- iterative: the latent loop is re-run on the corrupted prompt; at the step that computes a site's
  position the intervention is applied there, and the patched final state is projected into the
  next latent, so later latents are regenerated. The written value reaches later positions through
  attention and through the projection into the next fed latent. Each site is written once, at
  its own step: earlier positions are never re-patched, they are simply in the KV cache.
- feedback: as iterative, but at a step with a site the position is run twice: with the
  intervention on a frozen KV cache (its final state is projected into the next latent), and
  without it, which is what every later position attends to. The written value reaches later
  positions only through the projection. Sites must be latent positions.

All three then run [eot, eot suffix, prefix, answer...] over the KV cache (teacher-forced) and
decode greedily from there (`LatentModel.greedy_decode`, reusing the teacher-forced columns while the
greedy tokens equal them, then checking the clean and corrupted runs' own decodes, and the latest
distinct decodes of the pair's earlier patched runs, as drafts: a row whose greedy tokens follow one
of them decodes in one wide pass instead of one pass per token).
Sites in the teacher-forced answer apply to that pass.

A patched run cannot change anything before its first site, so each pair's unpatched corrupted
keys and values (and residual stream) are computed once and reused: a batch whose first site is at
column c copies the first c columns. A parallel run feeds the corrupted run's own inputs everywhere,
so no block below its lowest site's can change either: a parallel batch runs blocks f.. from the
corrupted residual entering block f (f = the lowest site block in the batch), with the corrupted
keys and values of blocks < f at every column. Many runs (rows), of one pair or several, share
each forward pass along the batch axis: rows of pairs whose prompts differ in length are
left-padded (masked cache columns; positions follow the mask) so that every row's latent t sits
in the same column; tails of different lengths are right-padded, which causal attention keeps out
of every real position. Results equal a batch of one to float rounding (~1e-6 in fp32): the same
modules run on the same inputs, only batched, padded and chunked differently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from interp.hooks import HEAD_HOOKS, NOT_POSITIONAL, Hook, layer_of
from interp.interventions import Clean, Intervention, Zero
from interp.kvcache import expand_cache, left_padded_cache
from interp.layout import MAX_NEW_TOKENS
from interp.model import Generation, LatentModel, Trace

Strategy = Literal["parallel", "iterative", "feedback"]
STRATEGIES: tuple[Strategy, ...] = ("parallel", "iterative", "feedback")
#: rows per forward pass at most, whatever the memory allows (SmolLM2 sweep on a 2-core CPU: 128 rows
#: run 8% faster than 64, 256 slower than 128)
MAX_ROWS = {"cpu": 128, "cuda": 512}
#: decodes of earlier patched runs kept per pair as drafts for later ones
MAX_DRAFTS = 8
#: CPU memory budget for one batch's tensors when MemAvailable cannot be read
CPU_BUDGET_BYTES = 2 * 1024**3


class PatchError(ValueError):
    """A patch that cannot be run as asked (unknown hook, out-of-range position, misaligned traces)."""


@dataclass(frozen=True)
class Site:
    """Where an intervention acts: a hook name, absolute positions, optionally one head."""

    hook: str
    positions: tuple[int, ...]
    head: int | None = None


@dataclass(frozen=True)
class Job:
    """One patched run of pair `pair`: `intervention` at `sites`, by `strategy`."""

    sites: tuple[Site, ...]
    strategy: Strategy
    pair: int = 0
    intervention: Intervention = field(default_factory=Clean)


@dataclass
class PatchResult:
    """The corrupted run with an intervention applied.

    answer_logits [d_vocab] at the trace's answer position; next_logits [d_vocab] at the last
    teacher-forced position (the first differing answer token when the traces carry the answers'
    common prefix); latents [K, d_model] what was fed; cache: the captured activations (a
    `PositionCache` in sweeps, an `ActivationCache` from `interp.patch`); generation: the greedy
    decode from eot after the patch (None when not decoded).
    """

    answer_logits: Tensor
    next_logits: Tensor
    latents: Tensor
    cache: Any
    generation: Generation | None

    @property
    def answer(self) -> float | None:
        return None if self.generation is None else self.generation.answer


class PositionCache:
    """Some hooks' activations of one patched run, at some positions.

    `cache[name]` is [1, seq, ...] like an `ActivationCache` entry, NaN at the positions that were
    not recorded (so a read of an unrecorded position cannot go unnoticed). `cache_dict` maps each
    name to its compact values [len(positions), ...].
    """

    def __init__(self, values: dict[str, Tensor], positions: Sequence[int], seq_len: int):
        self.cache_dict = values
        self.positions = list(positions)
        self.seq_len = seq_len

    def __getitem__(self, name: str) -> Tensor:
        v = self.cache_dict[name]
        full = torch.full((1, self.seq_len, *v.shape[1:]), math.nan, dtype=v.dtype, device=v.device)
        full[0, self.positions] = v
        return full

    def __contains__(self, name: str) -> bool:
        return name in self.cache_dict

    def keys(self):
        return self.cache_dict.keys()


# ----------------------------------------------------------------------------- argument checks


def check_hook(model: LatentModel, hook: str, head: int | None = None) -> None:
    """Raise a clear error for an unknown hook name or an out-of-range head."""
    if hook not in model.model.hook_dict:
        layer = layer_of(hook)
        if layer is not None and not 0 <= layer < model.cfg.n_layers:
            raise PatchError(f"layer {layer} out of range in {hook!r}: the model has layers 0..{model.cfg.n_layers - 1}")
        suffix = hook.split(".")[-1]
        similar = sorted(n for n in model.model.hook_dict if n.endswith(suffix))[:4] or sorted(model.model.hook_dict)[:4]
        raise PatchError(f"unknown hook {hook!r}; TransformerLens names look like {', '.join(similar)}")
    if hook.endswith(NOT_POSITIONAL):
        raise PatchError(f"{hook!r} is not indexed by position on its second axis; patch hook_z, hook_q/k/v or a residual hook")
    if head is not None:
        if not hook.endswith(HEAD_HOOKS):
            raise PatchError(f"a head index needs a per-head hook ({', '.join(HEAD_HOOKS)}), not {hook!r}")
        n_heads = model.cfg.n_key_value_heads if hook.endswith(("hook_k", "hook_v")) and model.cfg.n_key_value_heads else model.cfg.n_heads
        if not 0 <= head < n_heads:
            raise PatchError(f"head {head} out of range for {hook!r}: heads are 0..{n_heads - 1}")


def check_aligned(corrupted: Trace, clean: Trace) -> None:
    """Both traces must share their layout: same length, latent and answer positions."""
    if corrupted.seq_len != clean.seq_len:
        raise PatchError(
            f"traces of different lengths (corrupted {corrupted.seq_len}, clean {clean.seq_len} positions): "
            "patching needs prompts that tokenize to the same length; filter pairs with interp.data.align"
        )
    if corrupted.layout != clean.layout:
        raise PatchError("traces place their latents or answer at different positions; they cannot be patched into each other")


def check_job(model: LatentModel, trace: Trace, job: Job) -> None:
    """Every check a job must pass before anything runs."""
    if job.strategy not in STRATEGIES:
        raise PatchError(f"unknown strategy {job.strategy!r}; use one of {STRATEGIES}")
    if not isinstance(job.intervention, Intervention):
        raise PatchError(f"a job's intervention must be an Intervention, not {type(job.intervention).__name__} (wrap functions with interp.interventions.as_intervention)")
    for site in job.sites:
        check_hook(model, site.hook, site.head)
        bad = [p for p in site.positions if not 0 <= p < trace.seq_len]
        if bad:
            raise PatchError(f"position {bad[0]} out of range: the sequence has positions 0..{trace.seq_len - 1}")
        if job.strategy == "feedback":
            outside = [p for p in site.positions if p not in trace.latent_positions]
            if outside:
                raise PatchError(f"feedback patches latent positions only ({trace.latent_positions[0]}..{trace.latent_positions[-1]}); position {outside[0]} is {trace.position_names[outside[0]]}")


# ----------------------------------------------------------------------------- batch size


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def row_bytes(model: LatentModel, seq_len: int, chunk_len: int, n_logits: int) -> int:
    """An upper estimate of the memory one row of a batch needs at its peak.

    KV cache (twice: appending copies), the activations of one layer for a chunk (residual,
    q/k/v/z, attention scores and pattern in fp32, gated MLP), the logits read (fp32) and slack.
    """
    cfg = model.cfg
    b = torch.finfo(cfg.dtype).bits // 8
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    kv = 2 * cfg.n_layers * seq_len * 2 * n_kv * cfg.d_head * b
    layer = chunk_len * (8 * cfg.d_model + 4 * cfg.n_heads * cfg.d_head + 4 * cfg.d_mlp) * b
    scores = chunk_len * cfg.n_heads * seq_len * 4 * 3
    logits = n_logits * cfg.d_vocab * 4 * 2
    return int(1.5 * (kv + layer + scores + logits)) + 64 * 1024


def choose_batch_size(model: LatentModel, seq_len: int, chunk_len: int, n_logits: int, override: int | None = None) -> int:
    """Rows per forward pass: `override` if given, else what fits in free memory (capped by MAX_ROWS).

    CUDA: half of `torch.cuda.mem_get_info`'s free memory; CPU: a quarter of MemAvailable, at most
    `CPU_BUDGET_BYTES` (the estimate is from tensor sizes, see `row_bytes`).
    """
    if override is not None:
        if override < 1:
            raise ValueError(f"batch size must be >= 1, got {override}")
        return int(override)
    per_row = row_bytes(model, seq_len, chunk_len, n_logits)
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        budget, cap = free // 2, MAX_ROWS["cuda"]
    else:
        avail = _mem_available_bytes()
        budget = CPU_BUDGET_BYTES if avail is None else min(CPU_BUDGET_BYTES, avail // 4)
        cap = MAX_ROWS["cpu"]
    return max(1, min(cap, budget // per_row))


# ----------------------------------------------------------------------------- the engine


@dataclass
class _Pair:
    """One pair's traces and the layout facts the engine reads."""

    corrupted: Trace
    clean: Trace
    capture_positions: list[int]
    base: TransformerLensKeyValueCache | None = None
    #: the corrupted run's residual stream entering each block, [n_layers, seq, d_model] (made with `base`)
    resid_pre: Tensor | None = None
    #: the latest distinct decodes of this pair's patched runs (not the traces' own), drafts for later rows
    decodes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def n_prompt(self) -> int:
        return self.corrupted.layout.n_prompt

    @property
    def eot(self) -> int:
        return self.corrupted.layout.eot

    @property
    def seq_len(self) -> int:
        return self.corrupted.seq_len


@dataclass(frozen=True)
class _Row:
    """One job placed in a batch: its pair and the left padding that aligns its latents."""

    job: Job
    pair: _Pair
    offset: int  # column = position + offset


@dataclass(frozen=True)
class _Entry:
    """One value an intervention writes: batch row, column, head, and the source read beforehand."""

    row: int
    column: int
    head: int | None
    source: Tensor


def _writer(intervention: Intervention, entries: Sequence[_Entry], start: int, device: torch.device):
    """A hook function applying `intervention` at `entries` of a chunk starting at column `start`."""
    full = [e for e in entries if e.head is None]
    per_head = [e for e in entries if e.head is not None]

    def index(es: Sequence[_Entry]) -> tuple[Tensor, ...]:
        rows = torch.tensor([e.row for e in es], device=device)
        cols = torch.tensor([e.column - start for e in es], device=device)
        return (rows, cols) if es[0].head is None else (rows, cols, torch.tensor([e.head for e in es], device=device))

    groups = [(index(es), torch.stack([e.source for e in es]).to(device)) for es in (full, per_head) if es]

    def hook_fn(act: Tensor, hook) -> Tensor:
        act = act.clone()  # never in place: at blocks.0.hook_resid_pre the activation is the fed input
        for ix, source in groups:
            act[ix] = intervention.apply(act[ix], source)
        return act

    return hook_fn


@dataclass(frozen=True)
class EngineOptions:
    """The engine's shortcuts, each on by default; switching one off gives the same results, computed the
    long way (for ablations: `python -m benchmarks.bench --ablation`).

    prefix_reuse: rows start at their first site's column from the pair's cached corrupted prefix (off:
    every row runs from column 0); drafts: the greedy decode checks earlier runs' decodes as drafts (off:
    one token per pass once a row leaves the teacher-forced columns); lookup: a row no draft continues
    guesses its next tokens by n-gram lookup in its own decode and the drafts (`interp.model.lookup_guess`);
    dedup: identical jobs run once; parallel_skip: a parallel batch starts at its lowest site's block (off:
    at block 0).
    """

    prefix_reuse: bool = True
    drafts: bool = True
    lookup: bool = True
    dedup: bool = True
    parallel_skip: bool = True


def _job_key(job: Job) -> tuple:
    """What makes two jobs the same run (interventions with parameters compare by identity)."""
    iv = job.intervention
    return (job.pair, job.strategy, job.sites, iv if type(iv) in (Clean, Zero) else id(iv))


class BatchPatcher:
    """Batched patched runs of one or more (corrupted, clean) pairs of traces.

    `pairs` [(corrupted, clean), ...]; a `Job` names its pair by index. capture: a hook family
    (`hook_resid_post`, `attn.hook_z`) recorded in every block at `capture_positions[i]` of pair i
    (absolute, at or after the first latent), returned as `PatchResult.cache`. `decode=False`
    skips the greedy decode (`PatchResult.generation` is None).
    """

    def __init__(
        self,
        model: LatentModel,
        pairs: Sequence[tuple[Trace, Trace]],
        *,
        capture: str | None = None,
        capture_positions: Sequence[Sequence[int]] | None = None,
        batch_size: int | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        decode: bool = True,
        options: EngineOptions | None = None,
    ):
        if not pairs:
            raise PatchError("no pairs to patch")
        if capture_positions is not None and len(capture_positions) != len(pairs):
            raise PatchError(f"capture_positions has {len(capture_positions)} entries for {len(pairs)} pairs; give one list per pair")
        self.model, self.max_new_tokens, self.decode, self.options = model, max_new_tokens, decode, options or EngineOptions()
        self.pairs: list[_Pair] = []
        for i, (corrupted, clean) in enumerate(pairs):
            check_aligned(corrupted, clean)
            positions = sorted(set(capture_positions[i])) if capture_positions is not None else []
            pair = _Pair(corrupted, clean, positions)
            if any(p < pair.n_prompt or p >= pair.seq_len for p in positions):
                raise PatchError(f"capture positions of pair {i} must lie in {pair.n_prompt}..{pair.seq_len - 1} (the latents and after)")
            self.pairs.append(pair)
        self.k = self.pairs[0].corrupted.layout.num_latents
        if any(p.corrupted.layout.num_latents != self.k for p in self.pairs):
            raise PatchError("pairs traced with different numbers of latents cannot share a batch")
        self.capture_names: list[str] = []
        if capture is not None:
            self.capture_names = [f"blocks.{l}.{capture}" for l in range(model.cfg.n_layers) if f"blocks.{l}.{capture}" in model.model.hook_dict]
            if not self.capture_names:
                raise PatchError(f"no hook blocks.*.{capture} in the model")
        n_tail = max(p.seq_len - p.eot for p in self.pairs)
        longest = max(p.n_prompt for p in self.pairs) + self.k + n_tail
        widest = max(self.k + n_tail, max_new_tokens)  # the longest chunk: latents + tail, or a decode pass checking a draft
        self.batch_size = choose_batch_size(model, longest + 2 * max_new_tokens, widest, max(n_tail, max_new_tokens), batch_size)
        #: counters over this patcher's runs: rows, forward passes before decoding
        self.stats: dict[str, Any] = {"rows": 0, "forwards": 0}

    # ------------------------------------------------------------------ public

    def run(self, jobs: Sequence[Job]) -> list[PatchResult]:
        """The patched result of every job, in order.

        Identical jobs (same pair, strategy and sites, and the same intervention: equal for the
        parameterless `Clean` and `Zero`, the same object otherwise) run once; each gets its own
        `PatchResult` holding the same tensors. `stats["rows"]` counts the runs.
        """
        for job in jobs:
            check_job(self.model, self._pair(job).corrupted, job)
        first: dict[tuple, int] = {}
        distinct = [first.setdefault(_job_key(job), i) == i or not self.options.dedup for i, job in enumerate(jobs)]
        results: list[PatchResult | None] = [None] * len(jobs)
        for strategy in STRATEGIES:
            idx = [i for i, job in enumerate(jobs) if job.strategy == strategy and distinct[i]]
            # batches of runs that start late skip more: parallel runs skip the blocks below their first site's, the others the latent steps before it
            idx.sort(key=lambda i: (self._first_layer(jobs[i]) if strategy == "parallel" else 0, self._first_site(jobs[i]), jobs[i].pair))
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b : b + self.batch_size]
                with torch.no_grad():
                    out = self._run_batch([jobs[i] for i in chunk], strategy)
                for i, r in zip(chunk, out):
                    results[i] = r
        for i, job in enumerate(jobs):
            if not distinct[i]:
                results[i] = replace(results[first[_job_key(job)]])  # type: ignore[type-var]
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals

    def _pair(self, job: Job) -> _Pair:
        if not 0 <= job.pair < len(self.pairs):
            raise PatchError(f"job names pair {job.pair}, but the patcher holds pairs 0..{len(self.pairs) - 1}")
        return self.pairs[job.pair]

    def _first_site(self, job: Job) -> int:
        """The job's first site position relative to its first latent (K when it has none; < 0 in the prompt)."""
        pair = self._pair(job)
        positions = [min(p, pair.eot) for s in job.sites for p in s.positions]
        return min(positions) - pair.n_prompt if positions else self.k

    def _first_layer(self, job: Job) -> int:
        """The first block a job's intervention can change: the lowest block holding one of its sites (0 for hooks outside the blocks)."""
        layers = [layer_of(site.hook) for site in job.sites]
        return min((0 if layer is None else layer) for layer in layers) if layers else 0

    def _base(self, pair: _Pair) -> TransformerLensKeyValueCache:
        """The corrupted run's 1-row KV cache over its whole sequence (and `pair.resid_pre`), made once."""
        if pair.base is None:
            resid: dict[int, Tensor] = {}

            def grab(act: Tensor, hook) -> None:
                resid[layer_of(hook.name)] = act[0]

            pair.base = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.model.device, 1)
            hooks = [(f"blocks.{layer}.hook_resid_pre", grab) for layer in range(self.model.cfg.n_layers)]
            self.model.forward(pair.corrupted.input_embeds[None], kv_cache=pair.base, fwd_hooks=hooks, logit_positions=[])
            pair.base.freeze()
            pair.resid_pre = torch.stack([resid[layer] for layer in range(self.model.cfg.n_layers)])
        return pair.base

    def _prefix_cache(self, rows: Sequence[_Row], width: int, *, full_layers: int = 0, end: int = 0) -> TransformerLensKeyValueCache:
        """A len(rows)-row cache over columns [0, width): each row's pair's positions before
        column `width`, left-padded by its offset (zeros, masked out). With `full_layers` f > 0,
        blocks < f hold the corrupted run's keys and values of every column up to `end` (right-padded
        after shorter sequences): what a parallel run that starts at block f reads there."""
        bases = [self._base(r.pair) for r in rows]
        one_pair = len({id(r.pair) for r in rows}) == 1 and rows[0].offset == 0
        if one_pair:  # views, no copy
            cache = expand_cache(bases[0], len(rows), width)
        else:
            lengths = [max(0, width - r.offset) for r in rows]
            cache = left_padded_cache(bases, lengths, [width - n for n in lengths])
        if full_layers == 0:
            return cache
        if one_pair:
            full = expand_cache(bases[0], len(rows), end)
        else:
            lengths = [max(0, min(r.pair.seq_len, end - r.offset)) for r in rows]
            full = left_padded_cache(bases, lengths, [r.offset for r in rows], width=end, layers=full_layers)
        return TransformerLensKeyValueCache(entries=full.entries[:full_layers] + cache.entries[full_layers:], previous_attention_mask=cache.previous_attention_mask)

    def _columns(self, rows: Sequence[_Row], lo: int, hi: int, layer: int = 0) -> tuple[Tensor, Tensor]:
        """The corrupted run's inputs to block `layer` (0: the fed embeddings) at columns [lo, hi) of
        every row: (inputs [b, hi-lo, d], mask [b, hi-lo])."""
        model = self.model
        embeds = torch.zeros(len(rows), hi - lo, model.cfg.d_model, dtype=rows[0].pair.corrupted.input_embeds.dtype)
        mask = torch.zeros(len(rows), hi - lo, dtype=torch.long)
        for r, row in enumerate(rows):
            first, last = max(lo, row.offset), min(hi, row.pair.seq_len + row.offset)
            if first < last:
                source = row.pair.corrupted.input_embeds if layer == 0 else row.pair.resid_pre[layer]
                embeds[r, first - lo : last - lo] = source[first - row.offset : last - row.offset]
                mask[r, first - lo : last - lo] = 1
        return embeds.to(model.device), mask

    def _entries(self, rows: Sequence[_Row]) -> dict[tuple[str, int], tuple[Intervention, list[_Entry]]]:
        """Every value the batch writes, read from each row's clean trace: (hook, job intervention) -> entries."""
        plan: dict[tuple[str, int], tuple[Intervention, list[_Entry]]] = {}
        for r, row in enumerate(rows):
            iv = row.job.intervention
            for site in row.job.sites:
                _, entries = plan.setdefault((site.hook, id(iv)), (iv, []))
                entries += [_Entry(r, p + row.offset, site.head, iv.source(row.pair.clean, site.hook, p, site.head)) for p in site.positions]
        return plan

    def _run_batch(self, jobs: Sequence[Job], strategy: str) -> list[PatchResult]:
        """One batch of jobs of one strategy, possibly of several pairs.

        Columns: every row's latent t sits at column width + t, where width is the longest
        [question, bot] of the batch (shorter ones are left-padded); eot sits at column `eot`;
        tails shorter than the longest are right-padded.
        """
        model, k = self.model, self.k
        width = max(self._pair(j).n_prompt for j in jobs)
        rows = [_Row(j, self._pair(j), width - self._pair(j).n_prompt) for j in jobs]
        eot = width + k
        end = max(r.pair.seq_len + r.offset for r in rows)
        start = width + min(self._first_site(j) for j in jobs) if self.options.prefix_reuse else 0  # first column any row patches (<= eot)
        plan = self._entries(rows)
        store: dict[str, dict[int, Tensor]] = {name: {} for name in self.capture_names}

        def patch_hooks(lo: int, length: int) -> list[Hook]:
            hooks = []
            for (name, _), (iv, entries) in plan.items():
                inside = [e for e in entries if lo <= e.column < lo + length]
                if inside:
                    hooks.append((name, _writer(iv, inside, lo, model.device)))
            return hooks

        def capture_hooks(lo: int, length: int) -> list[Hook]:
            def grab(act: Tensor, hook) -> None:
                for i in range(act.shape[1]):  # a later pass over a column (feedback's kept pass) wins
                    store[hook.name][lo + i] = act[:, i].clone()

            return [(name, grab) for name in self.capture_names]

        def all_hooks(lo: int, length: int) -> list[Hook]:
            return patch_hooks(lo, length) + capture_hooks(lo, length)

        latents = torch.stack([r.pair.corrupted.latents for r in rows]).to(model.device)  # [b, K, d]
        first_layer = 0
        if strategy == "parallel":  # blocks before the first site's are the corrupted run's at every column
            first_layer = min(self._first_layer(j) for j in jobs) if self.options.parallel_skip else 0
            cache = self._prefix_cache(rows, start, full_layers=first_layer, end=end)
            embeds, mask = self._columns(rows, start, end, layer=first_layer)
            tail_start = start
        else:
            cache = self._prefix_cache(rows, start)
            first = start - width
            if start < width:  # sites in the prompt: run it from the first one, then latent 0 from bot
                embeds, mask = self._columns(rows, start, width)
                out = model.forward(embeds, kv_cache=cache, attention_mask=mask, fwd_hooks=all_hooks(start, width - start), logit_positions=[], start=start, thoughts=k > 0)
                if k > 0:
                    latents[:, 0] = out.thoughts[:, -1].to(latents)
                self.stats["forwards"] += 1
                first = 0
            if strategy == "iterative":
                model.latent_steps(latents, cache, first, width, hooks=all_hooks)
            else:
                model.latent_steps(latents, cache, first, width, hooks=capture_hooks, feedback_hooks=patch_hooks)
            self.stats["forwards"] += k - first
            embeds, mask = self._columns(rows, eot, end)
            tail_start = eot
        decode_col = eot + rows[0].pair.corrupted.layout.n_eot_suffix
        logit_positions = list(range(decode_col - tail_start, end - tail_start))  # from the last fed position on
        out = model.forward(embeds, kv_cache=cache, attention_mask=mask, fwd_hooks=all_hooks(tail_start, end - tail_start), logit_positions=logit_positions, start=tail_start, start_layer=first_layer)
        self.stats["forwards"] += 1
        self.stats["rows"] += len(rows)
        logits = out.logits  # [b, end - decode_col, vocab] (right-padded rows: garbage past their tail)
        answers = self._decode(rows, logits, cache, decode_col) if self.decode else [None] * len(rows)
        return self._results(rows, logits, latents, answers, store, start, decode_col, first_layer)

    def _decode(self, rows: Sequence[_Row], logits: Tensor, cache: TransformerLensKeyValueCache, decode_col: int) -> list[Tensor]:
        """Greedy decode of every row from its last fed position, reusing the teacher-forced columns."""
        forced = torch.full((len(rows), logits.shape[1] - 1), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens = row.pair.corrupted.tokens[decode_col - row.offset + 1 :]
            forced[r, : len(tokens)] = tokens
        drafts = []
        for row in rows:  # the unpatched runs' own decodes (the likelier first: parallel runs keep more of the corrupted run), then other runs' of this pair
            runs = (row.pair.corrupted, row.pair.clean) if row.job.strategy == "parallel" else (row.pair.clean, row.pair.corrupted)
            drafts.append([t.generation.answer_ids.tolist() for t in runs] + [list(d) for d in reversed(row.pair.decodes)])
        answers = self.model.greedy_decode(logits, forced, cache, max_new_tokens=self.max_new_tokens, drafts=drafts if self.options.drafts else None, lookup=self.options.lookup)
        for row, ids in zip(rows, answers):
            decoded = tuple(ids.tolist())
            known = decoded in row.pair.decodes or any(decoded == tuple(t.generation.answer_ids[: len(decoded)].tolist()) for t in (row.pair.corrupted, row.pair.clean))
            if not known:
                row.pair.decodes.append(decoded)
                del row.pair.decodes[:-MAX_DRAFTS]
        return answers

    def _results(self, rows, logits: Tensor, latents: Tensor, answers, store, start: int, decode_col: int, first_layer: int) -> list[PatchResult]:
        """PatchResults; captured activations before column `start`, or of blocks before `first_layer`, are the corrupted run's own."""
        model = self.model
        results = []
        for r, (row, ids) in enumerate(zip(rows, answers)):
            pair = row.pair
            lat = latents[r].cpu()
            gen = None
            if ids is not None:
                text = model.tokenizer.decode(ids, skip_special_tokens=True)
                gen = Generation(pair.corrupted.generation.question_ids, lat, ids, text, model.extract_answer(text))
            cache = None
            if self.capture_names:
                values = {}
                for name in self.capture_names:
                    unchanged = layer_of(name) < first_layer
                    parts = [pair.corrupted.cache[name][0, p] if unchanged or p + row.offset < start else store[name][p + row.offset][r] for p in pair.capture_positions]
                    values[name] = torch.stack(parts)
                cache = PositionCache(values, pair.capture_positions, pair.seq_len)
            answer_col = pair.corrupted.answer_position + row.offset - decode_col
            last_col = pair.seq_len - 1 + row.offset - decode_col
            results.append(PatchResult(answer_logits=logits[r, answer_col], next_logits=logits[r, last_col], latents=lat, cache=cache, generation=gen))
        return results


def full_cache_pass(model: LatentModel, corrupted: Trace, clean: Trace, job: Job, latents: Tensor) -> ActivationCache:
    """The cache of one teacher-forced pass over the corrupted sequence with the fed `latents`
    [K, d_model] and the job's intervention applied at its sites (parallel, iterative: equal to
    the patched run) or nowhere (feedback: the activations later positions attended to)."""
    embeds = corrupted.input_embeds.clone()
    embeds[corrupted.latent_positions] = latents.to(embeds)
    hooks = []
    if job.strategy != "feedback":
        iv = job.intervention
        for site in job.sites:
            entries = [_Entry(0, p, site.head, iv.source(clean, site.hook, p, site.head)) for p in site.positions]
            hooks.append((site.hook, _writer(iv, entries, 0, model.device)))
    return model.forward(embeds[None], fwd_hooks=hooks, with_cache=True).cache
