"""Fast patching: the same results as `interp.patching.run_patched`, with prefix reuse and batching.

A patch at latent t cannot change anything before latent t's position. So, for one pair:

- The corrupted run's keys and values of [question, bot, latents] are computed once, in one pass
  (`PairPatcher.base`); a batch of patched runs that all start at latent s (no site before s)
  copies the first `n_prompt + s` positions of it (`expand_cache`) and runs only the rest.
- Many patched runs (rows) share each forward pass along the batch axis. One hook per hook name
  writes the clean activation into the rows that patch that hook at that position (and head).
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
inputs, only batched and chunked differently. Sites outside the latent positions (e.g. the
validity checks' every-position sites) fall back to `run_patched`.

`PatchResult.cache` is a `PositionCache`: the hook family chosen by `capture` at the positions
chosen by `capture_positions`, which is what `interp.metrics.cache_similarity` reads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from interp.model import CodiModel, Generation, Hook, Trace, extract_answer, fast_layout
from interp.patching import STRATEGIES, PatchError, PatchResult, Site, Strategy, check_aligned, check_hook, run_patched

#: rows per forward pass at most, whatever the memory allows (beyond this CPUs gain nothing)
MAX_ROWS = {"cpu": 64, "cuda": 512}
#: CPU memory budget for one batch's tensors when MemAvailable cannot be read
CPU_BUDGET_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Job:
    """One patched run: clean activations written at `sites`, by `strategy`."""

    sites: tuple[Site, ...]
    strategy: Strategy


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


class PairPatcher:
    """Batched patched runs of one (corrupted, clean) pair of traces.

    capture: a hook family (`hook_resid_post`, `attn.hook_z`) recorded at `capture_positions`
    (absolute, at or after the first latent) in every block, returned as `PatchResult.cache`.
    Creating one stores the model's weights in `fast_layout` (same values, same results).
    """

    def __init__(
        self,
        model: CodiModel,
        corrupted: Trace,
        clean: Trace,
        *,
        capture: str | None = None,
        capture_positions: Sequence[int] = (),
        batch_size: int | None = None,
        max_new_tokens: int = 16,
    ):
        check_aligned(corrupted, clean)
        fast_layout(model)
        self.model, self.corrupted, self.clean = model, corrupted, clean
        self.n_prompt = corrupted.latent_positions[0]
        self.k = len(corrupted.latent_positions)
        self.eot = corrupted.position("eot")
        self.seq_len = corrupted.seq_len
        self.max_new_tokens = max_new_tokens
        self.capture_positions = sorted(set(capture_positions))
        if any(p < self.n_prompt or p >= self.seq_len for p in self.capture_positions):
            raise PatchError(f"capture positions must lie in {self.n_prompt}..{self.seq_len - 1} (the latents and after)")
        self.capture_names: list[str] = []
        if capture is not None:
            self.capture_names = [f"blocks.{l}.{capture}" for l in range(model.cfg.n_layers) if f"blocks.{l}.{capture}" in model.model.hook_dict]
            if not self.capture_names:
                raise PatchError(f"no hook blocks.*.{capture} in the model")
        n_tail = self.seq_len - self.eot
        self.batch_size = choose_batch_size(model, self.seq_len + max_new_tokens, self.seq_len - self.n_prompt, n_tail, batch_size)
        self._base: TransformerLensKeyValueCache | None = None
        #: counters over this patcher's runs: rows, forward passes, teacher-forced tokens each row's decode reused
        self.stats: dict[str, Any] = {"rows": 0, "forwards": 0, "accepted": []}
        self.teacher_tokens = corrupted.tokens[self.eot + 1 :].to(model.device)  # fed after eot

    @property
    def base(self) -> TransformerLensKeyValueCache:
        """The corrupted run's 1-row KV cache over [question, bot, latents] (positions < eot)."""
        if self._base is None:
            self._base = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.model.device, 1)
            with torch.no_grad():
                self.model.forward(self.corrupted.input_embeds[None, : self.eot], kv_cache=self._base, logit_positions=[])
            self._base.freeze()
        return self._base

    # ------------------------------------------------------------------ public

    def fast_path(self, job: Job) -> bool:
        """Whether the job runs batched: every site position is a latent position."""
        return all(self.n_prompt <= p < self.eot for s in job.sites for p in s.positions)

    def run(self, jobs: Sequence[Job]) -> list[PatchResult]:
        """The patched result of every job, in order (same fields as `run_patched`)."""
        results: list[PatchResult | None] = [None] * len(jobs)
        groups: dict[str, list[int]] = {s: [] for s in STRATEGIES}
        for i, job in enumerate(jobs):
            if job.strategy not in STRATEGIES:
                raise PatchError(f"unknown strategy {job.strategy!r}; use one of {STRATEGIES}")
            for site in job.sites:
                check_hook(self.model, site.hook, site.head)
                bad = [p for p in site.positions if not 0 <= p < self.seq_len]
                if bad:
                    raise PatchError(f"position {bad[0]} out of range: the sequence has positions 0..{self.seq_len - 1}")
            if self.fast_path(job):
                groups[job.strategy].append(i)
            else:
                results[i] = run_patched(self.model, self.corrupted, self.clean, job.sites, job.strategy, max_new_tokens=self.max_new_tokens)
        for strategy, idx in groups.items():
            idx.sort(key=lambda i: self._start(jobs[i]))  # batches of runs that start late skip more
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b : b + self.batch_size]
                with torch.no_grad():
                    out = self._run_batch([jobs[i].sites for i in chunk], strategy)
                for i, r in zip(chunk, out):
                    results[i] = r
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals

    def _start(self, job: Job) -> int:
        """Index of the first latent the job patches (K when it patches none)."""
        positions = [p for s in job.sites for p in s.positions]
        return min(positions) - self.n_prompt if positions else self.k

    def _patch_hooks(self, rows: Sequence[tuple[Site, ...]], start: int, length: int) -> list[Hook]:
        """One hook per hook name writing the clean activations of each row's sites in [start, start+length)."""
        plan: dict[str, dict[str, list[int]]] = {}
        for r, sites in enumerate(rows):
            for site in sites:
                for p in site.positions:
                    if start <= p < start + length:
                        d = plan.setdefault(site.hook, {"r": [], "c": [], "p": [], "hr": [], "hc": [], "hp": [], "hh": []})
                        keys, values = (("r", "c", "p"), (r, p - start, p)) if site.head is None else (("hr", "hc", "hp", "hh"), (r, p - start, p, site.head))
                        for key, value in zip(keys, values):
                            d[key].append(value)
        hooks = []
        device = self.model.device
        for name, d in plan.items():
            source = self.clean.cache[name][0]  # [seq, ...]
            ix = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in d.items()}
            full = source[ix["p"]] if d["r"] else None
            head = source[ix["hp"], ix["hh"]] if d["hr"] else None
            hooks.append((name, _writer(ix, full, head)))
        return hooks

    def _capture_hooks(self, start: int, length: int, store: dict[str, list[tuple[list[int], Tensor]]]) -> list[Hook]:
        inside = [p for p in self.capture_positions if start <= p < start + length]
        if not inside or not self.capture_names:
            return []
        rel = [p - start for p in inside]

        def grab(act: Tensor, hook) -> None:
            store[hook.name].append((inside, act[:, rel].clone()))

        return [(name, grab) for name in self.capture_names]

    def _run_batch(self, rows: Sequence[tuple[Site, ...]], strategy: str) -> list[PatchResult]:
        model, corrupted = self.model, self.corrupted
        b = len(rows)
        s = min(self._start(Job(sites, strategy)) for sites in rows)  # type: ignore[arg-type]
        start = self.n_prompt + s
        cache = expand_cache(self.base, b, start)
        store: dict[str, list[tuple[list[int], Tensor]]] = {name: [] for name in self.capture_names}
        latents = corrupted.latents.to(model.device)[None].repeat(b, 1, 1)  # [b, K, d]

        def hooks(chunk_start: int, length: int) -> list[Hook]:
            return self._patch_hooks(rows, chunk_start, length) + self._capture_hooks(chunk_start, length, store)

        if strategy == "iterative":
            for t in range(s, self.k):  # `latents` records what the loop fed (patches write into copies)
                out = model.forward(latents[:, t : t + 1], kv_cache=cache, fwd_hooks=hooks(self.n_prompt + t, 1), logit_positions=[])
                self.stats["forwards"] += 1
                if t + 1 < self.k:
                    latents[:, t + 1] = model.project(out.final[:, -1]).to(latents)
            start = self.eot
        chunk = corrupted.input_embeds[start:].to(model.device)[None].expand(b, -1, -1)
        tail = list(range(self.eot - start, self.seq_len - start))
        out = model.forward(chunk, kv_cache=cache, fwd_hooks=hooks(start, self.seq_len - start), logit_positions=tail)
        self.stats["forwards"] += 1
        self.stats["rows"] += b
        logits = out.logits  # [b, n_tail, vocab] at positions eot..seq_len-1
        answers = self._decode(logits, cache)
        return self._results(rows, logits, latents, answers, store, self.n_prompt + s)

    def _decode(self, logits: Tensor, cache: TransformerLensKeyValueCache) -> list[Tensor]:
        """Greedy decode from eot for every row: reuse the teacher-forced chunk while it agrees."""
        model = self.model
        b, n_tail = logits.shape[:2]
        eos, max_new = model.eos_id, self.max_new_tokens
        greedy = logits[:, :, : model.eot_id].argmax(dim=-1)  # [b, n_tail]: greedy token after each position
        agree = (greedy[:, :-1] == self.teacher_tokens[None]) & (greedy[:, :-1] != eos)
        accepted = agree.long().cumprod(dim=1).sum(dim=1)  # teacher-forced tokens the decode would emit itself
        self.stats["accepted"] += accepted.tolist()
        generated: list[list[int]] = []
        for r in range(b):
            a = int(accepted[r])
            generated.append(greedy[r, : a + 1].tolist()[:max_new])
        done = [g[-1] == eos or len(g) >= max_new for g in generated]
        active = [r for r in range(b) if not done[r]]
        if active:
            rows = torch.tensor(active, device=model.device)
            cache = select_rows(cache, rows)
            mask = cache.previous_attention_mask.clone()
            for i, r in enumerate(active):  # the teacher-forced positions this row did not take
                mask[i, self.eot + int(accepted[r]) + 1 :] = 0
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

    def _results(self, rows, logits: Tensor, latents: Tensor, answers: list[Tensor], store, start: int) -> list[PatchResult]:
        corrupted, model = self.corrupted, self.model
        answer_rel = corrupted.answer_position - self.eot
        before = [p for p in self.capture_positions if p < start]  # unpatched: the corrupted run's own
        per_name: dict[str, Tensor] = {}
        for name in self.capture_names:
            parts_pos = list(before)
            parts = [corrupted.cache[name][0][before][None].expand(len(rows), *([-1] * (corrupted.cache[name].dim() - 1)))] if before else []
            for positions, values in store[name]:
                parts_pos += positions
                parts.append(values)
            values = torch.cat(parts, dim=1)
            order = sorted(range(len(parts_pos)), key=parts_pos.__getitem__)
            per_name[name] = values[:, order]
        results = []
        for r, ids in enumerate(answers):
            text = model.tokenizer.decode(ids, skip_special_tokens=True)
            lat = latents[r].cpu()
            gen = Generation(corrupted.generation.question_ids, lat, ids, text, extract_answer(text))
            cache = PositionCache({n: v[r] for n, v in per_name.items()}, self.capture_positions, self.seq_len) if self.capture_names else None
            results.append(PatchResult(answer_logits=logits[r, answer_rel], next_logits=logits[r, -1], latents=lat, cache=cache, generation=gen))
        return results


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
    patcher = PairPatcher(model, corrupted, clean, capture=capture, capture_positions=capture_positions, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return patcher.run(jobs)
