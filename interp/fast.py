"""Fast patching: the same results as `interp.patching.run_patched`, with prefix reuse and batching.

A patch at latent t cannot change anything before latent t's position. So:

- Each pair's corrupted keys and values of [question, bot, latents] are computed once, in one pass
  (`BatchPatcher._base`); a batch of patched runs that all start at latent s (no site before s)
  copies the first `n_prompt + s` positions of their pairs' caches and runs only the rest.
- Many patched runs (rows), of one pair or several, share each forward pass along the batch axis.
  Rows of pairs whose questions differ in length are left-padded (masked cache columns; rotary
  positions follow the mask), so that every row's latent t sits in the same column; tails
  ([eot, prefix, answer common prefix]) of different lengths are right-padded, which causal
  attention keeps out of every real position. One hook per hook name writes the clean activation
  into the rows that patch that hook at that column (and head), each from its own pair's clean run.
- parallel rows run [latents s.., eot, prefix, answer common prefix] as one chunk, latent inputs
  held at the corrupted run's own latents. iterative rows run the latent loop in lockstep, one
  position per step, the patch written at its own step and the patched final state projected into
  the next latent; then [eot, prefix, answer...] as one chunk over the KV cache: the same
  computation as the reference's final teacher-forced pass.
- The greedy decode from eot (the patched answer) reuses the teacher-forced chunk while the greedy
  token equals the teacher-forced one ("The answer is:" and the answers' common prefix): those
  steps are exactly what the decode would compute. A row that leaves the teacher-forced path masks
  the rest of it out of its attention (rotary positions follow the mask, so its next token sits at
  the right position) and continues step by step; finished rows leave the batch.

Results agree with `run_patched` to float rounding (~1e-6 in fp32): the same modules run on the same
inputs, only batched, padded and chunked differently. Sites outside the latent positions (e.g. the
validity checks' every-position sites) fall back to `run_patched`.

`PatchResult.cache` is a `PositionCache`: the hook family chosen by `capture` at the positions
chosen by `capture_positions`, which is what `interp.metrics.cache_similarity` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from interp.model import CodiModel, Generation, Hook, Trace, extract_answer
from interp.patching import STRATEGIES, PatchError, PatchResult, Site, Strategy, check_aligned, check_hook, run_patched

#: rows per forward pass at most, whatever the memory allows (beyond this CPUs gain nothing)
MAX_ROWS = {"cpu": 64, "cuda": 512}
#: CPU memory budget for one batch's tensors when MemAvailable cannot be read
CPU_BUDGET_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Job:
    """One patched run: clean activations written at `sites`, by `strategy`, in pair `pair` of the patcher."""

    sites: tuple[Site, ...]
    strategy: Strategy
    pair: int = 0


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


# ----------------------------------------------------------------------------- KV cache helpers


def expand_cache(cache: TransformerLensKeyValueCache, batch: int, length: int | None = None) -> TransformerLensKeyValueCache:
    """A `batch`-row cache holding the first `length` positions of a 1-row cache.

    The rows are views (no copy); the first append of a forward pass writes new tensors, so the
    source cache is never modified.
    """
    src_len = cache.entries[0].past_keys.shape[1]
    length = src_len if length is None else length
    if cache.entries[0].past_keys.shape[0] != 1 or not 0 <= length <= src_len:
        raise ValueError(f"expand_cache needs a 1-row cache of at least {length} positions")
    out = TransformerLensKeyValueCache(
        entries=[type(e)(e.past_keys[:, :length].expand(batch, -1, -1, -1), e.past_values[:, :length].expand(batch, -1, -1, -1)) for e in cache.entries],
        previous_attention_mask=cache.previous_attention_mask[:, :length].expand(batch, -1),
    )
    return out


def select_rows(cache: TransformerLensKeyValueCache, rows: Tensor) -> TransformerLensKeyValueCache:
    """The cache restricted to batch rows `rows` (a copy)."""
    return TransformerLensKeyValueCache(
        entries=[type(e)(e.past_keys[rows], e.past_values[rows]) for e in cache.entries],
        previous_attention_mask=cache.previous_attention_mask[rows],
    )


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


def row_bytes(model: CodiModel, seq_len: int, chunk_len: int, n_logits: int) -> int:
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


def choose_batch_size(model: CodiModel, seq_len: int, chunk_len: int, n_logits: int, override: int | None = None) -> int:
    """Rows per forward pass: `override` if given, else what fits in free memory (capped by MAX_ROWS).

    CUDA: half of `torch.cuda.mem_get_info`'s free memory; CPU: a quarter of MemAvailable, at most
    `CPU_BUDGET_BYTES` (the estimate is from tensor sizes, see `row_bytes`).
    """
    if override is not None:
        if override < 1:
            raise ValueError(f"batch size must be >= 1, got {override}")
        return int(override)
    device = model.device
    per_row = row_bytes(model, seq_len, chunk_len, n_logits)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
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

    @property
    def n_prompt(self) -> int:  # question + bot: the first latent's position
        return self.corrupted.latent_positions[0]

    @property
    def eot(self) -> int:
        return self.corrupted.position("eot")

    @property
    def seq_len(self) -> int:
        return self.corrupted.seq_len

    @property
    def n_tail(self) -> int:  # eot, prefix and teacher-forced answer tokens
        return self.seq_len - self.eot


@dataclass(frozen=True)
class _Row:
    """One job placed in a batch: its pair and the left padding that aligns its latents."""

    job: Job
    pair: _Pair
    offset: int  # column = position + offset


class BatchPatcher:
    """Batched patched runs of one or more (corrupted, clean) pairs of traces.

    `pairs` [(corrupted, clean), ...]; a `Job` names its pair by index. capture: a hook family
    (`hook_resid_post`, `attn.hook_z`) recorded in every block at `capture_positions[i]` of pair i
    (absolute, at or after the first latent), returned as `PatchResult.cache`.
    """

    def __init__(
        self,
        model: CodiModel,
        pairs: Sequence[tuple[Trace, Trace]],
        *,
        capture: str | None = None,
        capture_positions: Sequence[Sequence[int]] | None = None,
        batch_size: int | None = None,
        max_new_tokens: int = 16,
    ):
        if not pairs:
            raise PatchError("no pairs to patch")
        if capture_positions is not None and len(capture_positions) != len(pairs):
            raise PatchError(f"capture_positions has {len(capture_positions)} entries for {len(pairs)} pairs; give one list per pair")
        self.model, self.max_new_tokens = model, max_new_tokens
        self.pairs: list[_Pair] = []
        for i, (corrupted, clean) in enumerate(pairs):
            check_aligned(corrupted, clean)
            positions = sorted(set(capture_positions[i])) if capture_positions is not None else []
            pair = _Pair(corrupted, clean, positions)
            if any(p < pair.n_prompt or p >= pair.seq_len for p in positions):
                raise PatchError(f"capture positions of pair {i} must lie in {pair.n_prompt}..{pair.seq_len - 1} (the latents and after)")
            self.pairs.append(pair)
        self.k = len(self.pairs[0].corrupted.latent_positions)
        if any(len(p.corrupted.latent_positions) != self.k for p in self.pairs):
            raise PatchError("pairs traced with different numbers of latents cannot share a batch")
        self.capture_names: list[str] = []
        if capture is not None:
            self.capture_names = [f"blocks.{l}.{capture}" for l in range(model.cfg.n_layers) if f"blocks.{l}.{capture}" in model.model.hook_dict]
            if not self.capture_names:
                raise PatchError(f"no hook blocks.*.{capture} in the model")
        longest = max(p.n_prompt for p in self.pairs) + self.k + max(p.n_tail for p in self.pairs)
        self.batch_size = choose_batch_size(model, longest + max_new_tokens, self.k + max(p.n_tail for p in self.pairs), max(p.n_tail for p in self.pairs), batch_size)
        #: counters over this patcher's runs: rows, forward passes, teacher-forced tokens each row's decode reused
        self.stats: dict[str, Any] = {"rows": 0, "forwards": 0, "accepted": []}

    # ------------------------------------------------------------------ public

    def fast_path(self, job: Job) -> bool:
        """Whether the job runs batched: every site position is a latent position."""
        pair = self._pair(job)
        return all(pair.n_prompt <= p < pair.eot for s in job.sites for p in s.positions)

    def run(self, jobs: Sequence[Job]) -> list[PatchResult]:
        """The patched result of every job, in order (same fields as `run_patched`)."""
        results: list[PatchResult | None] = [None] * len(jobs)
        groups: dict[str, list[int]] = {s: [] for s in STRATEGIES}
        for i, job in enumerate(jobs):
            pair = self._pair(job)
            if job.strategy not in STRATEGIES:
                raise PatchError(f"unknown strategy {job.strategy!r}; use one of {STRATEGIES}")
            for site in job.sites:
                check_hook(self.model, site.hook, site.head)
                bad = [p for p in site.positions if not 0 <= p < pair.seq_len]
                if bad:
                    raise PatchError(f"position {bad[0]} out of range: the sequence has positions 0..{pair.seq_len - 1}")
            if self.fast_path(job):
                groups[job.strategy].append(i)
            else:
                results[i] = run_patched(self.model, pair.corrupted, pair.clean, job.sites, job.strategy, max_new_tokens=self.max_new_tokens)
        for strategy, idx in groups.items():
            idx.sort(key=lambda i: (self._start(jobs[i]), jobs[i].pair))  # batches of runs that start late skip more
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b : b + self.batch_size]
                with torch.no_grad():
                    out = self._run_batch([jobs[i] for i in chunk], strategy)
                for i, r in zip(chunk, out):
                    results[i] = r
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals

    def _pair(self, job: Job) -> _Pair:
        if not 0 <= job.pair < len(self.pairs):
            raise PatchError(f"job names pair {job.pair}, but the patcher holds pairs 0..{len(self.pairs) - 1}")
        return self.pairs[job.pair]

    def _start(self, job: Job) -> int:
        """Index of the first latent the job patches (K when it patches none)."""
        positions = [p for s in job.sites for p in s.positions]
        return min(positions) - self._pair(job).n_prompt if positions else self.k

    def _base(self, pair: _Pair) -> TransformerLensKeyValueCache:
        """The corrupted run's 1-row KV cache over [question, bot, latents] (positions < eot), made once."""
        if pair.base is None:
            pair.base = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.model.device, 1)
            self.model.forward(pair.corrupted.input_embeds[None, : pair.eot], kv_cache=pair.base, logit_positions=[])
            pair.base.freeze()
        return pair.base

    def _prefix_cache(self, rows: Sequence[_Row], width: int) -> TransformerLensKeyValueCache:
        """A len(rows)-row cache over columns [0, width): each row's pair's first `width - offset`
        positions, left-padded by its offset (zeros, masked out)."""
        if len({id(r.pair) for r in rows}) == 1:
            return expand_cache(self._base(rows[0].pair), len(rows), width)  # one pair: views, no copy
        caches = [self._base(r.pair) for r in rows]
        entries = []
        for layer, entry in enumerate(caches[0].entries):
            keys, values = [], []
            for r, c in zip(rows, caches):
                e = c.entries[layer]
                keys.append(torch.nn.functional.pad(e.past_keys[:, : width - r.offset], (0, 0, 0, 0, r.offset, 0)))
                values.append(torch.nn.functional.pad(e.past_values[:, : width - r.offset], (0, 0, 0, 0, r.offset, 0)))
            entries.append(type(entry)(torch.cat(keys), torch.cat(values)))
        mask = torch.cat([torch.nn.functional.pad(c.previous_attention_mask[:, : width - r.offset], (r.offset, 0)) for r, c in zip(rows, caches)])
        return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask)

    def _patch_hooks(self, rows: Sequence[_Row], start: int, length: int) -> list[Hook]:
        """One hook per hook name writing the clean activations of each row's sites in columns [start, start+length)."""
        plan: dict[str, dict[str, list]] = {}
        for r, row in enumerate(rows):
            for site in row.job.sites:
                for p in site.positions:
                    if start <= p + row.offset < start + length:
                        d = plan.setdefault(site.hook, {"r": [], "c": [], "src": [], "hr": [], "hc": [], "hh": [], "hsrc": []})
                        value = row.pair.clean.cache[site.hook][0, p]  # [d] or [heads, d_head]
                        if site.head is None:
                            d["r"].append(r), d["c"].append(p + row.offset - start), d["src"].append(value)
                        else:
                            d["hr"].append(r), d["hc"].append(p + row.offset - start), d["hh"].append(site.head), d["hsrc"].append(value[site.head])
        hooks = []
        device = self.model.device
        for name, d in plan.items():
            ix = {k: torch.tensor(d[k], dtype=torch.long, device=device) for k in ("r", "c", "hr", "hc", "hh")}
            full = torch.stack(d["src"]) if d["src"] else None
            head = torch.stack(d["hsrc"]) if d["hsrc"] else None
            hooks.append((name, _writer(ix, full, head)))
        return hooks

    def _capture_hooks(self, start: int, store: dict[str, list[tuple[int, Tensor]]]) -> list[Hook]:
        """Hooks keeping the capture family's activations of a chunk that starts at column `start`."""

        def grab(act: Tensor, hook) -> None:
            store[hook.name].append((start, act.clone()))

        return [(name, grab) for name in self.capture_names]

    def _run_batch(self, jobs: Sequence[Job], strategy: str) -> list[PatchResult]:
        """One batch of jobs of one strategy, possibly of several pairs.

        Columns: every row's latent t sits at column width + t, where width is the longest
        [question, bot] of the batch (shorter ones are left-padded); eot sits at column `eot`;
        tails shorter than the longest are right-padded (masked; causal attention keeps them out
        of every real position).
        """
        model, k = self.model, self.k
        width = max(self._pair(j).n_prompt for j in jobs)
        rows = [_Row(j, self._pair(j), width - self._pair(j).n_prompt) for j in jobs]
        b, device = len(rows), model.device
        s = min(self._start(j) for j in jobs)
        start, eot = width + s, width + k
        n_tail = max(r.pair.n_tail for r in rows)
        cache = self._prefix_cache(rows, start)
        store: dict[str, list[tuple[int, Tensor]]] = {name: [] for name in self.capture_names}
        latents = torch.stack([r.pair.corrupted.latents for r in rows]).to(device)  # [b, K, d]

        def hooks(chunk_start: int, length: int) -> list[Hook]:
            return self._patch_hooks(rows, chunk_start, length) + self._capture_hooks(chunk_start, store)

        if strategy == "iterative":
            for t in range(s, k):  # `latents` records what the loop fed (patches write into copies)
                out = model.forward(latents[:, t : t + 1], kv_cache=cache, fwd_hooks=hooks(width + t, 1), logit_positions=[])
                self.stats["forwards"] += 1
                if t + 1 < k:
                    latents[:, t + 1] = model.project(out.final[:, -1]).to(latents)
            start = eot
        chunk, mask = _right_padded([r.pair.corrupted.input_embeds[start - r.offset :] for r in rows], eot + n_tail - start)
        out = model.forward(chunk.to(device), kv_cache=cache, attention_mask=mask, fwd_hooks=hooks(start, chunk.shape[1]), logit_positions=list(range(eot - start, eot + n_tail - start)))
        self.stats["forwards"] += 1
        self.stats["rows"] += b
        logits = out.logits  # [b, n_tail, vocab] at columns eot.. (right-padded rows: garbage past their tail)
        answers = self._decode(rows, logits, cache, eot)
        return self._results(rows, logits, latents, answers, store, width + s)

    def _decode(self, rows: Sequence[_Row], logits: Tensor, cache: TransformerLensKeyValueCache, eot: int) -> list[Tensor]:
        """Greedy decode from eot for every row: reuse the teacher-forced chunk while it agrees."""
        model = self.model
        b, n_tail = logits.shape[:2]
        eos, max_new = model.eos_id, self.max_new_tokens
        teacher = torch.full((b, n_tail - 1), -1, dtype=torch.long, device=model.device)  # fed after eot; -1 = padding
        for r, row in enumerate(rows):
            tokens = row.pair.corrupted.tokens[row.pair.eot + 1 :]
            teacher[r, : len(tokens)] = tokens.to(model.device)
        greedy = logits[:, :, : model.eot_id].argmax(dim=-1)  # [b, n_tail]: greedy token after each column
        agree = (greedy[:, :-1] == teacher) & (greedy[:, :-1] != eos)
        accepted = agree.long().cumprod(dim=1).sum(dim=1)  # teacher-forced tokens the decode would emit itself
        self.stats["accepted"] += accepted.tolist()
        generated = [greedy[r, : int(accepted[r]) + 1].tolist()[:max_new] for r in range(b)]
        active = [r for r in range(b) if generated[r][-1] != eos and len(generated[r]) < max_new]
        if active:
            cache = select_rows(cache, torch.tensor(active, device=model.device))
            mask = cache.previous_attention_mask.clone()
            for i, r in enumerate(active):  # the teacher-forced (and padded) columns this row did not take
                mask[i, eot + int(accepted[r]) + 1 :] = 0
            cache.previous_attention_mask = mask
            while active:
                ids = torch.tensor([generated[r][-1] for r in active], device=model.device)
                out = model.forward(model.embed(ids[:, None]), kv_cache=cache, logit_positions=[0])
                self.stats["forwards"] += 1
                nxt = out.logits[:, -1, : model.eot_id].argmax(dim=-1).tolist()
                keep = []
                for i, r in enumerate(active):
                    generated[r].append(nxt[i])
                    if nxt[i] != eos and len(generated[r]) < max_new:
                        keep.append(i)
                if len(keep) < len(active):
                    active = [active[i] for i in keep]
                    if active:
                        cache = select_rows(cache, torch.tensor(keep, device=model.device))
        return [torch.tensor(g, dtype=torch.long) for g in generated]

    def _results(self, rows: Sequence[_Row], logits: Tensor, latents: Tensor, answers: list[Tensor], store, start: int) -> list[PatchResult]:
        """PatchResults; captured activations before column `start` are the corrupted run's own."""
        model = self.model
        captured = {name: (pieces[0][0], torch.cat([v for _, v in pieces], dim=1)) for name, pieces in store.items() if pieces}
        results = []
        for r, (row, ids) in enumerate(zip(rows, answers)):
            pair = row.pair
            text = model.tokenizer.decode(ids, skip_special_tokens=True)
            lat = latents[r].cpu()
            gen = Generation(pair.corrupted.generation.question_ids, lat, ids, text, extract_answer(text))
            cache = None
            if self.capture_names:
                values = {}
                for name in self.capture_names:
                    parts = []
                    for p in pair.capture_positions:
                        col = p + row.offset
                        if col < start:
                            parts.append(pair.corrupted.cache[name][0, p])
                        else:
                            first, acts = captured[name]
                            parts.append(acts[r, col - first])
                    values[name] = torch.stack(parts)
                cache = PositionCache(values, pair.capture_positions, pair.seq_len)
            tail = pair.n_tail
            answer_rel = pair.corrupted.answer_position - pair.eot
            results.append(PatchResult(answer_logits=logits[r, answer_rel], next_logits=logits[r, tail - 1], latents=lat, cache=cache, generation=gen))
        return results


def _right_padded(chunks: Sequence[Tensor], length: int) -> tuple[Tensor, Tensor]:
    """Stack [n_i, d] chunks into [b, length, d] with zeros after each, and the mask [b, length]."""
    out = torch.zeros(len(chunks), length, chunks[0].shape[-1], dtype=chunks[0].dtype, device=chunks[0].device)
    mask = torch.zeros(len(chunks), length, dtype=torch.long)
    for r, c in enumerate(chunks):
        out[r, : c.shape[0]] = c
        mask[r, : c.shape[0]] = 1
    return out, mask


def _writer(ix: dict[str, Tensor], full: Tensor | None, head: Tensor | None):
    """A hook writing `full` at (rows ix["r"], chunk positions ix["c"]) and `head` at (ix["hr"], ix["hc"], ix["hh"])."""

    def hook_fn(act: Tensor, hook) -> Tensor:
        act = act.clone()  # never in place: at blocks.0.hook_resid_pre the activation is the fed input
        if full is not None:
            act[ix["r"], ix["c"]] = full.to(act.dtype)
        if head is not None:
            act[ix["hr"], ix["hc"], ix["hh"]] = head.to(act.dtype)
        return act

    return hook_fn


def run_patched_batch(
    model: CodiModel,
    corrupted: Trace,
    clean: Trace,
    jobs: Sequence[Job],
    *,
    capture: str | None = None,
    capture_positions: Sequence[int] = (),
    batch_size: int | None = None,
    max_new_tokens: int = 16,
) -> list[PatchResult]:
    """`run_patched` for many jobs of one pair at once (see the module docstring)."""
    patcher = BatchPatcher(model, [(corrupted, clean)], capture=capture, capture_positions=[capture_positions], batch_size=batch_size, max_new_tokens=max_new_tokens)
    return patcher.run(jobs)
