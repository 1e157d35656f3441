"""`interp generate | pairs | patch | run | report | analyze | train`: thin commands over the package (the benchmarks are `python -m benchmarks.bench` in a source checkout)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from interp.layout import MAX_NEW_TOKENS
from interp.runio import RunError, UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the most faithful shipped model that may serve as a default; it is named when it loads)")
    g.add_argument("--model", default=None, help="a model shipped with interp, by name (interp.shipped.SHIPPED: aligned, coconut, coconut-stage3, ...; see the README's findings table)")
    g.add_argument(
        "--checkpoint",
        help="CODI or Coconut checkpoint (the family is read from its keys): a hub id (zen-E/CODI-gpt2, zen-E/CODI-llama3.2-1b-Instruct), "
        "a directory or a file (CODI: model.safetensors / pytorch_model.bin; Coconut: checkpoint_N, the latest in a directory)",
    )
    g.add_argument(
        "--base",
        help="base model: a hub id or a local Hugging Face directory (config + tokenizer); optional for the official "
        "CODI hub checkpoints (CODI-gpt2 -> gpt2, CODI-llama3.2-1b-Instruct -> meta-llama/Llama-3.2-1B-Instruct), required for Coconut",
    )
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --checkpoint")
    g.add_argument("--base-revision", default=None, help="hub revision of --base")
    g.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="CODI only. LoRA alpha: not stored in checkpoints; official code default 16, released scripts 32 (default 32). The value used is printed when the model loads",
    )
    g.add_argument("--num-latents", type=int, default=None, help="continuous thoughts (default: a shipped model's own, else 6; `generate` takes 0: no thoughts)")
    g.add_argument(
        "--remove-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CODI only. --remove-eos (default, the released scripts): [question, bot] and [eot] before decoding; --no-remove-eos (the official code's default): [question, eos, bot] and [eot, eos]",
    )
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def model_spec(args: argparse.Namespace):
    """The `ModelSpec` the arguments name (the CLI and the Ray workers load the model from it)."""
    from interp.executor import ModelSpec

    if args.checkpoint is None and args.base is not None:
        raise UsageError("--base needs --checkpoint (or give neither for a shipped model)")
    if args.model is not None and args.checkpoint is not None:
        raise UsageError(f"--model {args.model} and --checkpoint {args.checkpoint}: give one (a shipped model by name, or a checkpoint)")
    if args.checkpoint is not None:
        checkpoint, num_latents = args.checkpoint, 6 if args.num_latents is None else args.num_latents
    else:
        checkpoint, num_latents = f"shipped:{_shipped_name(args)}", _shipped_model(args).num_latents
    return ModelSpec(
        checkpoint=checkpoint,
        base=args.base,
        dtype=args.dtype,
        device=args.device or "auto",
        lora_alpha=args.lora_alpha,
        num_latents=num_latents,
        remove_eos=args.remove_eos,
        revision=args.revision,
        base_revision=args.base_revision,
    )


def _shipped_name(args: argparse.Namespace) -> str:
    """The shipped model the arguments name: --model, or the first default (`interp.shipped.defaults`)."""
    from interp.shipped import SHIPPED, defaults

    if args.model is None:
        return defaults()[0]
    if args.model not in SHIPPED:
        raise UsageError(f"--model {args.model}: accepted: {', '.join(SHIPPED)}")
    return args.model


def _shipped_model(args: argparse.Namespace):
    from interp.shipped import shipped

    return shipped(_shipped_name(args))


def load_model(args: argparse.Namespace):
    """The model the arguments name; its `load_options` are kept on `args` for `model_provenance`."""
    model = model_spec(args).load()
    o = model.load_options
    if args.checkpoint is None:
        m = _shipped_model(args)
        ok, why = m.qualification()
        label = "forced by its training: a check of the tools, not a finding" if m.forced else "trained by the published objective alone"
        print(f"model: shipped {m.name!r} ({m.objective}; {label}; {why}; card {m.card})")
    else:
        base = o["base"]["ref"] if isinstance(o["base"], dict) else o["base"]
        if o["family"] == "codi":
            detail = f"lora_alpha {o['lora_alpha']:g} (LoRA rank {o['lora_rank']}; alpha is not stored in checkpoints: official code default 16, released scripts 32), remove_eos {o['remove_eos']}"
        else:
            ckpt = o["checkpoint"]["path"] if isinstance(o["checkpoint"], dict) else o["checkpoint"]
            detail = f"{ckpt}, {o['num_latents']} thoughts (not stored in checkpoints)"
        print(f"loaded {o['family']} checkpoint {args.checkpoint} on base {base}: {detail}", file=sys.stderr)
    args.load_options = o
    return model


def model_provenance(args: argparse.Namespace) -> dict:
    """What run.json records about the model: the arguments, and the loader's options once loaded
    (resolved paths, hub commits, lora_alpha, num_latents, remove_eos, dtype)."""
    shipped = None if args.checkpoint is not None else f"shipped:{_shipped_name(args)}"
    out = {"checkpoint": args.checkpoint or shipped, "base": args.base or shipped, "lora_alpha": args.lora_alpha, "dtype": args.dtype}
    if getattr(args, "load_options", None) is not None:
        out["load_options"] = args.load_options
    return out


# ----------------------------------------------------------------------------- commands


def cmd_generate(args: argparse.Namespace) -> None:
    model = load_model(args)
    gen = model.generate(args.question, max_new_tokens=args.max_new_tokens)
    for t, row in enumerate(model.decode_latents(gen, k=args.top_k)):
        state = ", ".join(f"{tok!r} {p:.2f}" for tok, p in row["state"])
        emb = ", ".join(f"{tok!r} {p:.2f}" for tok, p in row["embedding"])
        print(f"latent[{t}]  state: {state}  |  embedding: {emb}")
    print(f"answer text: {gen.text!r}")
    print(f"answer: {gen.answer}")


def build_pairs(args: argparse.Namespace, model) -> tuple[list, dict]:
    """Pairs from the chosen source, aligned to the model's tokenizer, optionally model-filtered."""
    from collections import Counter

    from interp.data import align_to_model, arithmetic_pairs, filter_by_model, gsm8k_pairs, three_step_pairs

    counts: dict[str, Counter] = {"source": Counter(), "align": Counter(), "model": Counter()}
    if args.source in ("arithmetic", "three-step"):
        count = args.n * 2 if args.filter else args.n
        steps = args.steps or (_shipped_model(args).task_steps if args.checkpoint is None else 6)
        pairs = arithmetic_pairs(count, steps=steps, seed=args.seed) if args.source == "arithmetic" else three_step_pairs(count, seed=args.seed)
        counts["source"]["read"] = counts["source"]["corrupted"] = len(pairs)
    elif args.source == "prosqa":
        pairs = prosqa_source(args, counts["source"])
    else:
        pairs = gsm8k_pairs(args.gsm8k, split=args.split, seed=args.seed, counts=counts["source"])
    aligned = [a.pair for a in align_to_model(pairs, model, counts=counts["align"])]
    if args.source == "prosqa":  # every candidate edit was aligned: keep each problem's first that aligns
        firsts = {p.source["index"]: p for p in reversed(aligned)}
        aligned = [p for p in aligned if firsts[p.source["index"]] is p]
    fits = [p for p in aligned if fits_context(model, p.clean_question)]  # the model filter generates
    counts["align"]["drop.longer_than_context"] = len(aligned) - len(fits)
    if aligned and not fits:
        raise UsageError(f"--source {args.source}: every question is longer than the model's context allows (n_ctx {model.cfg.n_ctx}); accepted: a source this model was trained for")
    aligned = fits
    if args.filter:
        aligned = filter_by_model(model, aligned, both=True, counts=counts["model"])
    kept = aligned[: args.n]
    for stage, c in counts.items():
        if c:
            print(f"{stage}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    print(f"kept: {len(kept)} pairs")
    meta = {"source": args.source, "seed": args.seed, "n": args.n, "counts": {k: dict(v) for k, v in counts.items()}, "kept": len(kept)}
    return kept, meta


def fits_context(model, question: str) -> bool:
    """The question, its thoughts and a greedy decode fit the model's context (`LatentModel.check_question`)."""
    try:
        model.check_question(question)
    except ValueError:
        return False
    return True


def prosqa_source(args: argparse.Namespace, counts) -> list:
    """ProsQA pairs (every candidate edit) from `--prosqa FILE` (the official JSON), or from 2n new
    problems of the released recipe (`--seed`) when no file is given."""
    from interp.data import generate_prosqa, load_prosqa, prosqa_pairs

    problems = load_prosqa(args.prosqa) if args.prosqa else generate_prosqa(2 * args.n, seed=args.seed)
    return prosqa_pairs(problems, seed=args.seed, counts=counts, per_problem=None)


def cmd_pairs(args: argparse.Namespace) -> None:
    from interp.data import save_pairs

    model = load_model(args)
    pairs, meta = build_pairs(args, model)
    save_pairs(args.out, pairs, meta)
    print(f"wrote {args.out}")


def sweep_config(args: argparse.Namespace):
    from interp.engine import STRATEGIES
    from interp.sweep import KINDS, SweepConfig

    strategies = STRATEGIES if args.strategy == "all" else tuple(args.strategy.split(","))
    layers = None
    if args.layers is not None:
        try:
            layers = tuple(int(x) for x in args.layers.split(","))
        except ValueError:
            raise UsageError(f"--layers {args.layers}: accepted: comma-separated layer numbers, e.g. 0,2,3") from None
    kinds = tuple(args.kinds.split(",")) if args.kinds is not None else KINDS
    return SweepConfig(hook=args.hook, strategies=strategies, kinds=kinds, layers=layers, seed=args.seed, intervention=args.intervention)


def wandb_logger(args: argparse.Namespace, config) -> object | None:
    if not args.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --wandb needs the wandb package: pip install 'interp[wandb]'") from None
    run = wandb.init(project="interp", name=Path(args.out).name, config={**vars(config), "out": str(args.out)})
    return run.log


def ray_executor(args: argparse.Namespace):
    """(RayExecutor, ModelSpec) for `--ray [ADDRESS] --workers N`, or (None, None) to run in this process."""
    if args.ray is None:
        return None, None
    from interp.executor import RayExecutor

    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: accepted: 1 or more")
    spec = model_spec(args)
    try:
        return RayExecutor(address=args.ray or None, workers=args.workers), spec
    except ImportError as exc:
        raise UsageError(f"--ray: {exc}") from None


def run_patch_sweep(args: argparse.Namespace, model, pairs, provenance: dict, pairs_meta: dict | None = None) -> dict:
    """The sweep of `patch` and `run`: everything is checked before wandb or the run directory is touched.

    `pairs_meta`, when given, saves the pairs to the run directory's pairs.json (under its lock).
    """
    from interp.sweep import check_sweep, run_sweep

    config = sweep_config(args)
    if args.quick:
        print(f"--quick: running the first {min(5, len(pairs))} of {len(pairs)} pairs")
        pairs = pairs[:5]
    check_sweep(model, pairs, config)
    from interp.report import write_examples

    executor, spec = ray_executor(args)
    summary = run_sweep(model, pairs, args.out, config, provenance=provenance, logger=wandb_logger(args, config), force_new=args.force_new, pairs_meta=pairs_meta, executor=executor, model_spec=spec)
    write_examples(model, pairs, args.out)  # after the sweep: the run directory is checked and written under its lock first
    print(summary["verdict"])
    if summary["validity"]["n_failed"]:
        print(f"VALIDITY: {summary['validity']['n_failed']} pair(s) failed a check, see {Path(args.out) / 'summary.json'}")
    return summary


def cmd_patch(args: argparse.Namespace) -> None:
    from interp.attribution_run import check_method
    from interp.data import load_pairs
    from interp.runio import check_output_dir

    check_method(args.method, args.top_k)
    check_output_dir(args.out)
    pairs, meta = load_pairs(args.pairs)
    model = load_model(args)
    provenance = {**model_provenance(args), "pairs_file": str(args.pairs), "pairs_meta": meta}
    if args.method == "exact":
        run_patch_sweep(args, model, pairs, provenance)
    else:
        run_attribution_sweep(args, model, pairs, provenance)


def run_attribution_sweep(args: argparse.Namespace, model, pairs, provenance: dict) -> None:
    """`interp patch --method atp|atp+verify`: attribution patching into --out, then its report."""
    from interp.attribution_run import AttributionConfig, run_attribution
    from interp.engine import STRATEGIES

    strategies = STRATEGIES if args.strategy == "all" else tuple(args.strategy.split(","))
    if args.quick:
        print(f"--quick: running the first {min(5, len(pairs))} of {len(pairs)} pairs")
        pairs = pairs[:5]
    config = AttributionConfig(hooks=tuple(args.hook.split(",")), strategies=strategies, top_k=args.top_k)
    summary = run_attribution(model, pairs, args.out, config, provenance=provenance, force_new=args.force_new)
    for strategy, s in summary["strategies"].items():
        verified = f", Spearman vs exact {s['spearman']:.3f}, top-{args.top_k} recall {s['top_k_recall']:.2f}, {len(s['unconfirmed'])} unconfirmed" if "verified" in s else ""
        print(f"{strategy}: {s['sites']} sites over {s['pairs']} pairs{verified}")
    print(f"report: {Path(args.out) / 'report.html'}")


def cmd_report(args: argparse.Namespace) -> None:
    from interp.report import export_pngs, write_report

    path = write_report(args.run_dir)
    pngs = export_pngs(args.run_dir) if not args.no_png else []
    print(f"report: {path}" + (f" (+{len(pngs)} PNG figures)" if pngs else ""))


def cmd_run(args: argparse.Namespace) -> None:
    """The main job: pairs -> patch sweep -> report, on the embedded model unless a checkpoint is given.

    With `--checkpoints a,b,c`: one run directory per checkpoint under --out (same base and options,
    the same pairs: those of --pairs, or built and filtered with the first checkpoint), then
    `comparison.json` and `comparison.html` across them.
    """
    if args.checkpoints:
        return run_checkpoints(args)
    from interp.data import load_pairs
    from interp.report import export_pngs, write_report
    from interp.runio import check_output_dir

    out = check_output_dir(args.out)
    if args.pairs:
        pairs, meta = load_pairs(args.pairs)
    model = load_model(args)
    if not args.pairs:  # built here and saved in the run directory once the sweep holds its lock
        pairs, meta = build_pairs(args, model)
    run_patch_sweep(args, model, pairs, {**model_provenance(args), "pairs_meta": meta}, pairs_meta=None if args.pairs else meta)
    report = write_report(out)
    export_pngs(out)
    print(f"report: {report}")


def run_checkpoints(args: argparse.Namespace) -> None:
    """`interp run --checkpoints a,b,c`: a run directory per checkpoint and a comparison across them."""
    import copy

    from interp.data import load_pairs, save_pairs
    from interp.report import write_comparison
    from interp.runio import check_output_dir

    if args.checkpoint:
        raise UsageError("--checkpoint and --checkpoints: give one of them")
    names = [c for c in args.checkpoints.split(",") if c]
    if len(names) != len(set(names)) or not names:
        raise UsageError(f"--checkpoints {args.checkpoints}: accepted: distinct checkpoint paths or hub ids, comma-separated")
    out = check_output_dir(args.out)
    dirs = {name: out / re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")) for name in names}
    if len(set(dirs.values())) != len(dirs):
        raise UsageError(f"--checkpoints {args.checkpoints}: two checkpoints map to one run directory name; rename one")
    pairs = meta = None
    if args.pairs:
        pairs, meta = load_pairs(args.pairs)
    for name, run_dir in dirs.items():
        one = copy.copy(args)
        one.checkpoint, one.out = name, str(run_dir)
        model = load_model(one)
        if pairs is None:  # built and filtered with the first checkpoint; every run uses these
            pairs, meta = build_pairs(one, model)
            out.mkdir(parents=True, exist_ok=True)
            save_pairs(out / "pairs.json", pairs, meta)
        print(f"== {name} -> {run_dir}")
        run_patch_sweep(one, model, pairs, {**model_provenance(one), "pairs_meta": meta})
        del model
    print(f"comparison: {write_comparison(list(dirs.values()), out, labels=names)}")


def cmd_analyze(args: argparse.Namespace) -> None:
    """Logit lens, probes, attention flow and knockout on the clean side of the pairs (interp.analysis)."""
    from interp.analysis import analyze, problems_from_pairs

    model = load_model(args)
    if args.quick:
        args.n = min(args.n, 60)
        print(f"--quick: {args.n} problems, knockout at all layers at once only")
    pairs, meta = build_pairs(args, model)
    data = analyze(model, problems_from_pairs(pairs), args.out, quick=args.quick, provenance={**model_provenance(args), "pairs_meta": meta}, force_new=args.force_new)
    print(f"analysis: {Path(args.out) / 'analysis.json'} ({', '.join(f'{k} {len(v)} rows' for k, v in data.items() if isinstance(v, list))})")
    print(f"report: {Path(args.out) / 'report.html'}")


#: each objective's trainer family and default preset
OBJECTIVES = {"aligned": ("codi", "embedded"), "codi": ("codi", "codi"), "coconut": ("coconut", "embedded"), "pause": ("coconut", "embedded"), "direct": ("coconut", "embedded")}


def cmd_train(args: argparse.Namespace) -> None:
    """`interp train --objective aligned|codi` (CODI format: interp.train.trainer) or `coconut|pause|direct`
    (the Coconut curriculum and its controls, official checkpoint_N format: interp.train.coconut)."""
    if args.objective not in OBJECTIVES:
        raise UsageError(f"--objective {args.objective}: accepted: {', '.join(OBJECTIVES)}")
    trainer, default_preset = OBJECTIVES[args.objective]
    preset = args.preset or default_preset
    if trainer == "codi":
        from interp.train import cli_train

        cli_train(preset, args.out, args.seed, args.resume)
    else:
        from interp.train.coconut import cli_train_coconut

        cli_train_coconut(args.objective, args.out, preset, args.seed, args.resume)


def cmd_findings(args: argparse.Namespace) -> None:
    """`interp findings [--write README.md]`: the table from each shipped model's metrics, study and analysis files."""
    from interp.findings import findings_table, write_table

    table = findings_table()
    if args.write:
        write_table(args.write, table)
        print(f"wrote the findings table into {args.write}")
    else:
        print(table)


# ----------------------------------------------------------------------------- parser


def add_sweep_args(p: argparse.ArgumentParser, default_out: str | None) -> None:
    p.add_argument("--hook", default="resid_post", help="hook family (resid_pre|resid_mid|resid_post|attn_out|mlp_out) or a template like 'blocks.{L}.attn.hook_z'")
    p.add_argument(
        "--strategy", default="all", help="all (parallel,iterative,feedback) or a comma-separated subset: parallel (attention only), iterative (attention and projection), feedback (projection only)"
    )
    p.add_argument("--kinds", default=None, help="comma-separated subset of single,all,cumulative (default: all three)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: every layer)")
    p.add_argument("--out", required=default_out is None, default=default_out, help="run directory (resumes if it exists)")
    p.add_argument("--quick", action="store_true", help="5 pairs only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (honours WANDB_MODE=offline)")
    p.add_argument("--intervention", default="clean", help="what is written at the sites: clean (the clean run's activation), mean (mean over every pair's clean run), zero")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help="run the units on Ray actors (pip install 'interp[ray]'): a cluster address, or none for a local Ray instance")
    p.add_argument("--workers", type=int, default=2, help="Ray actors, each loading the model once (GPU actors when the cluster has GPUs)")
    p.add_argument("--force-new", action="store_true", help="wipe the run in --out (its results, run.json, summary, report) and start over")


def add_pair_source_args(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument(
        "--source",
        choices=["arithmetic", "gsm8k", "three-step", "prosqa"],
        default="arithmetic",
        help="three-step: Cywinski et al.'s word problems (for real checkpoints; the embedded model knows only arithmetic); "
        "prosqa: Coconut's graph problems (--prosqa FILE, or new problems of the released recipe)",
    )
    p.add_argument("--prosqa", default=None, help="ProsQA JSON file in the official format (e.g. ../shared/data/prosqa/test.json); default: generate new problems")
    p.add_argument("--n", type=positive_int, default=n, help="number of pairs to keep (1 or more)")
    p.add_argument("--steps", type=positive_int, default=None, help="arithmetic: operations per problem (default: the shipped model's chain length, else 6)")
    p.add_argument("--gsm8k", default=None, help="GSM8K JSONL file or directory (default: the hub copy via `datasets`)")
    p.add_argument("--split", default="test")
    p.add_argument("--no-filter", dest="filter", action="store_false", help="keep pairs the model gets wrong")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; accepted: 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}; accepted: 1 or more")
    return value


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (`interp CMD: error: ...`), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def check_model_args(args: argparse.Namespace) -> None:
    """The model arguments that can be checked without loading anything: UsageError, one line.

    `--device`: cpu, cuda or cuda:N, and CUDA only where it is available; `--num-latents`: 1 or more (0 for `generate`),
    and for the embedded model (no --checkpoint) only its own number, since it is trained with it;
    `--base`: a local directory's config.json must be JSON.
    """
    import json
    import re

    if args.device is not None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
            raise UsageError(f"--device {args.device}: accepted: cpu, cuda, cuda:N")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine; accepted: cpu")
    least = 0 if args.command == "generate" else 1  # sweeps and analyses need a thought to patch
    if args.num_latents is not None and args.num_latents < least:
        raise UsageError(f"--num-latents {args.num_latents}: accepted: {least} or more")
    if args.checkpoint is None and args.base is None:
        m = _shipped_model(args)
        if args.num_latents not in (None, m.num_latents):
            raise UsageError(f"--num-latents {args.num_latents}: the shipped model {m.name!r} is trained with {m.num_latents}; accepted: {m.num_latents}, or --checkpoint/--base for another model")
    config = Path(args.base) / "config.json" if args.base is not None else None
    if config is not None and config.is_file():
        try:
            json.loads(config.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsageError(f"--base {args.base}: {config} is not JSON ({exc}); accepted: a Hugging Face model directory") from None


def parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="interp", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="run the latent loop on one question")
    add_model_args(p)
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--top-k", type=int, default=3)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("pairs", help="build clean/corrupted pairs and write a pairs file")
    add_model_args(p)
    add_pair_source_args(p, n=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("patch", help="patching sweep over a pairs file")
    add_model_args(p)
    p.add_argument("--pairs", required=True)
    add_sweep_args(p, default_out=None)
    p.add_argument(
        "--method",
        default="exact",
        help="exact (one patched run per test, the sweep), atp (attribution patching: every site of the --hook families, "
        "comma-separated, e.g. z,resid_post, from one backward pass per pair and strategy) or atp+verify (atp, then each pair's --top-k sites patched exactly)",
    )
    p.add_argument("--top-k", type=int, default=0, help="with --method atp+verify: sites per pair and strategy patched exactly")
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("run", help="pairs -> patch sweep -> report (the main job)")
    add_model_args(p)
    add_pair_source_args(p, n=40)
    p.add_argument("--pairs", default=None, help="use this pairs file instead of building pairs")
    p.add_argument("--checkpoints", default=None, help="comma-separated checkpoints (paths or hub ids, one base): a run directory each under --out and a comparison report")
    add_sweep_args(p, default_out="results/run")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write report.html (+ PNGs) for a run directory")
    p.add_argument("run_dir")
    p.add_argument("--no-png", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("analyze", help="logit lens by layer, linear probes, attention flow and knockout -> analysis.json + report.html")
    add_model_args(p)
    add_pair_source_args(p, n=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="at most 60 problems; knockout at all layers at once only")
    p.add_argument("--out", required=True, help="output directory (resumes an analysis of the same model, problems and options; refuses another)")
    p.add_argument("--force-new", action="store_true", help="wipe an earlier analysis in --out and start over")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("train", help="train a model by objective (aligned: the shipped CODI model; codi: the published objective alone; coconut: the curriculum; pause, direct: controls)")
    p.add_argument("--objective", default="aligned", help="aligned (default), codi, coconut, pause or direct")
    p.add_argument("--preset", default=None, help="the trainer's preset (default: embedded; codi for --objective codi; micro for seconds-long tests)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out (coconut, pause, direct: its last saved step; aligned, codi: phase 1 and finished phase-2 stages)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("findings", help="the findings table (a row per question, a column per shipped model) from the models' result files")
    p.add_argument("--write", default=None, metavar="README.md", help="replace the table block in this file instead of printing it")
    p.set_defaults(func=cmd_findings)

    return ap


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        if hasattr(args, "num_latents"):
            check_model_args(args)
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # usage: an argument or input file (UsageError, PatchError, ...)
        from interp.sweep import FLAGS, ConfigError

        message = exc.message(FLAGS[exc.field]) if isinstance(exc, ConfigError) else str(exc)  # SweepConfig fields as the flags that set them
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except (RunError, OSError) as exc:  # failure: a locked run directory, a full disk, an unreadable file
        print(f"error: {exc}" + ("; rerun the same command to resume once fixed" if isinstance(exc, OSError) else ""), file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
