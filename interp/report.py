"""One self-contained HTML page for a run directory, and PNGs of its figures.

    write_report("results/run1")   # -> results/run1/report.html (plotly.js inline, works offline)
    export_pngs("results/run1")    # -> results/run1/png/*.png, if kaleido and Chromium are installed

The page holds the run's config (run.json), the validity checks (validity.jsonl; failures in
red), the verdict (summary.json) and every figure of `report_figures`.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from interp.engine import STRATEGIES
from interp.plots import MIN_CI_PAIRS, difference_heatmap, heatmap, layer_lines, load_results, similarity_heatmap, slot_heatmap
from interp.runio import flatten, read_jsonl
from interp.stats import METRICS

#: browsers kaleido can drive, looked up on the PATH (Debian's `chromium` package included)
BROWSERS = ("google-chrome", "chrome", "chromium", "chromium-browser")

STYLE = """
html { overflow-y: scroll; }
body { font-family: system-ui, sans-serif; margin: 1em auto; padding: 0 1.5em; box-sizing: border-box; max-width: 1400px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table.kv, table.validity { border-collapse: collapse; font-size: 0.9em; }
table.kv td, table.validity td, table.validity th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.fail { background: #fdd; color: #a00; font-weight: bold; } td.pass { color: #060; }
.verdict { background: #f4f4f8; border-left: 4px solid #446; padding: 0.8em 1em; font-size: 1.05em; }
.scroll { max-height: 420px; overflow: auto; }
.figure { margin: 1.5em 0; }
"""
MAX_LISTED = 12


def report_figures(df: pd.DataFrame, run: dict[str, Any]) -> list[tuple[str, go.Figure]]:
    """(name, figure) for every figure of a report: heatmaps of each kind, the paired differences,
    per-layer lines and the activation similarities; names are file stems for the PNGs."""
    config = run.get("config", {})
    ci = {"n_resamples": int(config.get("bootstrap", 2000)), "seed": int(config.get("seed", 0))}
    kinds = [k for k in ("single", "cumulative", "all") if k in set(df["kind"])]
    strategies = set(df["strategy"])
    both = {"parallel", "iterative"} <= strategies
    figs: list[tuple[str, go.Figure]] = []
    for kind in kinds:
        for metric in METRICS if kind == "single" else ("normalized_effect",):
            figs.append((f"heatmap_{metric}_{kind}", heatmap(df, metric, kind=kind, **ci)))
    if both:
        figs += [(f"difference_normalized_effect_{kind}", difference_heatmap(df, "normalized_effect", kind, **ci)) for kind in kinds]
    if "all" in kinds:
        figs += [(f"layers_{metric}_all", layer_lines(df, metric, "all", **ci)) for metric in ("normalized_effect", "kl")]
    if "single" in kinds and "changed_slot" in df and df["changed_slot"].notna().any():
        figs.append(("slots_normalized_effect_single", slot_heatmap(df, "normalized_effect", "single", **ci)))
    for kind in kinds if "sim_cos" in df else ():  # the similarities of every patched latent set (when the run's metrics recorded them)
        for latents in sorted({tuple(x) for x in df.loc[df["kind"] == kind, "latents"]}):
            tag = f"{kind}_{'-'.join(map(str, latents))}"
            figs += [(f"similarity_sim_cos_{s}_{tag}", similarity_heatmap(df, "sim_cos", s, kind, latents)) for s in STRATEGIES if s in strategies]
            if both and "par_cos" in df:
                figs.append((f"similarity_par_cos_{tag}", similarity_heatmap(df, "par_cos", "iterative", kind, latents)))
    return figs


#: every quantity the page shows, defined once
DEFINITIONS = {
    "logit_diff": "logit of the clean answer's first differing token minus the corrupted answer's, at the position that predicts it (teacher-forced).",
    "normalized_effect": "(patched logit_diff - corrupted logit_diff) / (clean logit_diff - corrupted logit_diff): 0 = no effect, 1 = the clean run restored.",
    "kl": "KL(clean || patched) in nats between the next-token distributions at that position.",
    "flip": "the patched run's freely decoded answer equals the clean answer (shown as a rate).",
    "sim_cos / sim_rel_l2": "per (layer read out, position): cosine and |patched - clean| / |clean| of the hook family's activation, "
    "patched run vs clean run; par_cos / par_rel_l2: iterative run vs parallel run. The y axis is the layer read out, each panel one patched layer.",
    "latent_cos": "cosine of each fed latent of the patched run with the clean run's latent.",
    "changed slot": "which number of the problem the corrupted side changed (arithmetic: 0 = the start value, i = operand i).",
    "mean and 95% CI": f"mean over pairs, percentile bootstrap 95% CI over pairs; a cell marked † rests on fewer than {MIN_CI_PAIRS} pairs.",
    "verdict": "iterative and parallel differ in a (layer, latent set) cell when the bootstrap CI of their paired difference in normalized_effect excludes 0.",
}


FAMILY_NAMES = {"codi": "CODI (thought = prj of the final-normed state)", "coconut": "Coconut (thought = the final-normed state itself)"}


def model_line(load_options: dict[str, Any]) -> str:
    """One line naming the model family, architecture and number of thoughts, from the loader's options."""
    family = load_options.get("family", "?")
    return f"Model: {FAMILY_NAMES.get(family, family)}, {load_options.get('model_type', '?')} base, {load_options.get('num_latents', '?')} thoughts."


def definitions_html() -> str:
    return "<dl>" + "".join(f"<dt><b>{html.escape(k)}</b></dt><dd>{html.escape(v)}</dd>" for k, v in DEFINITIONS.items()) + "</dl>"


def write_examples(model, pairs, run_dir: str | Path, n: int = 3, k: int = 3) -> Path:
    """`run_dir/examples.json`: the first `n` pairs' clean questions with the top-`k` decoded tokens of
    each latent (`LatentModel.decode_latents`), which the report shows."""
    examples = []
    for pair in list(pairs)[:n]:
        gen = model.generate(pair.clean_question)
        examples.append({"question": pair.clean_question, "answer": gen.text, "intermediates": list(pair.clean_intermediates), "latents": model.decode_latents(gen, k=k)})
    path = Path(run_dir) / "examples.json"
    path.write_text(json.dumps(examples, indent=1))
    return path


def examples_table(examples: list[dict[str, Any]]) -> str:
    """One table per example: per latent, the top tokens of its state and of its fed embedding."""
    if not examples:
        return "<p>No examples.json: <code>interp run</code> and <code>interp patch</code> write it.</p>"
    out = []
    for ex in examples:

        def tops(pairs: list) -> str:
            return ", ".join(f"{html.escape(repr(tok))} {p:.2f}" for tok, p in pairs)

        rows = "".join(f"<tr><td>latent[{t}]</td><td>{tops(d['state'])}</td><td>{tops(d['embedding'])}</td></tr>" for t, d in enumerate(ex["latents"]))
        values = " ".join(f"{v:g}" for v in ex.get("intermediates", []))
        out.append(
            f"<p><code>{html.escape(ex['question'])}</code> → {html.escape(ex['answer'])}" + (f" (intermediate values: {html.escape(values)})" if values else "") + "</p>"
            f'<table class="validity"><tr><th>latent</th><th>state (what the thought map reads)</th><th>fed embedding</th></tr>{rows}</table>'
        )
    return "".join(out)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _value(v: Any) -> str:
    if isinstance(v, list) and len(v) > MAX_LISTED:
        v = v[:MAX_LISTED] + [f"… ({len(v) - MAX_LISTED} more)"]
    return html.escape(v if isinstance(v, str) else json.dumps(v))


def config_table(run: dict[str, Any]) -> str:
    """run.json as a key/value table (nested keys dotted, long lists shortened)."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{_value(v)}</code></td></tr>" for k, v in flatten(run).items())
    return f'<table class="kv">{rows}</table>'


def validity_table(validity: list[dict[str, Any]], tolerance: float) -> str:
    """One row per pair, one column per check (max |Δ logits|); failed checks in red, failing pairs first."""
    if not validity:
        return "<p>No validity checks were recorded.</p>"
    names = list(dict.fromkeys(name for v in validity for name in v["checks"]))
    failed = [v for v in validity if not v["passed"]]
    head = "".join(f"<th>{html.escape(n).replace('/', '/<br>')}</th>" for n in names)
    body = []
    for v in sorted(validity, key=lambda v: v["passed"]):
        cells = []
        for n in names:
            c = v["checks"].get(n)
            cells.append("<td>missing</td>" if c is None else f'<td class="{"pass" if c["passed"] else "fail"}">{c["max_abs_diff"]:.2e}</td>')
        status = '<td class="pass">passed</td>' if v["passed"] else '<td class="fail">FAILED</td>'
        body.append(f"<tr><td>{html.escape(str(v['pair_id']))}</td>{status}{''.join(cells)}</tr>")
    line = f"<p>{len(validity) - len(failed)} of {len(validity)} pairs passed every check (max |Δ logits| &lt; {tolerance:g}).</p>"
    table = f'<div class="scroll"><table class="validity"><tr><th>pair</th><th>status</th>{head}</tr>{"".join(body)}</table></div>'
    return line + table


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html`: config, validity checks, verdict and every figure, plotly.js inline once."""
    run_dir = Path(run_dir)
    df = load_results(run_dir)
    run = _read_json(run_dir / "run.json") or {}
    summary = _read_json(run_dir / "summary.json")
    validity = read_jsonl(run_dir / "validity.jsonl")
    tolerance = (summary or {}).get("validity", {}).get("tolerance", 1e-3)
    verdict = summary["verdict"] if summary else "No summary.json: the run has not finished (rerun the same command to resume it)."
    figs = report_figures(df, run)
    divs = "".join(f'<div class="figure" id="{name}">{fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}")}</div>' for name, fig in figs)
    counts = f"{df['pair_id'].nunique()} pairs, {len(df)} patch tests, hook {html.escape(str(run.get('config', {}).get('hook', '?')))}"
    examples = examples_table(json.loads((run_dir / "examples.json").read_text()) if (run_dir / "examples.json").exists() else [])
    analysis = _read_json(run_dir / "analysis.json")
    if analysis is not None:
        from interp.analysis.run import analysis_section

        examples += f"<h2>What the latents hold (analysis.json)</h2>{analysis_section(analysis)}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>interp report: {html.escape(run_dir.name)}</title>
<style>{STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>Patching sweep: {html.escape(run_dir.name)}</h1>
<p>{counts}</p>
<p>{html.escape(model_line(run.get("fingerprint", {}).get("model", {}).get("load_options", {})))}</p>
<h2>Verdict</h2>
<p class="verdict">{html.escape(verdict)}</p>
<h2>Validity checks</h2>
{validity_table(validity, tolerance)}
<h2>Definitions</h2>
{definitions_html()}
<h2>Example problems and their decoded latents</h2>
{examples}
<h2>Figures</h2>
{divs}
<h2>Run configuration (run.json)</h2>
{config_table(run)}
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def export_pngs(run_dir: str | Path, width: int = 1200) -> list[Path]:
    """PNGs of the report's figures in `run_dir/png/` with kaleido and a Chrome or Chromium on the PATH
    (or at BROWSER_PATH). Without a browser, or when the exporter fails, warn in one line and return [].
    """
    run_dir = Path(run_dir)
    browser = os.environ.get("BROWSER_PATH") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if browser is None:
        warnings.warn("PNG export skipped: it needs Chrome or Chromium (Debian: apt-get install chromium); report.html is complete without the PNGs", stacklevel=2)
        return []
    os.environ.setdefault("BROWSER_PATH", browser)  # kaleido's browser: Debian's chromium where Chrome is not installed
    figs = report_figures(load_results(run_dir), _read_json(run_dir / "run.json") or {})
    out = run_dir / "png"
    paths = [out / f"{name}.png" for name, _ in figs]
    try:
        out.mkdir(exist_ok=True)
        pio.write_images([fig for _, fig in figs], paths, width=width, height=[fig.layout.height for _, fig in figs])
    except Exception as exc:  # any exporter failure: the PNGs are optional
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings.warn(f"PNG export skipped ({type(exc).__name__}: {first}); report.html is complete without the PNGs", stacklevel=2)
        return []
    return paths


def write_comparison(run_dirs: list[Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """`comparison.json` and `comparison.html` in `out`: several runs (one per checkpoint) side by side.

    Per run and (strategy, kind): the mean normalized effect and flip rate over pairs, layers and latent
    sets, with the bootstrap CI of the mean over pairs of each pair's mean; and each run's verdict.
    """
    from interp.runio import atomic_write_json
    from interp.stats import cell_stats

    out = Path(out)
    labels = labels or [d.name for d in run_dirs]
    rows, verdicts = [], {}
    for label, run_dir in zip(labels, run_dirs):
        df = load_results(run_dir)
        per_pair = df.groupby(["pair_id", "strategy", "kind"], as_index=False)[["normalized_effect", "flip"]].mean()
        for metric in ("normalized_effect", "flip"):
            for r in cell_stats(per_pair, metric, 2000, 0, ("strategy", "kind")).to_dict("records"):
                rows.append({"checkpoint": label, "metric": metric, **r})
        verdicts[label] = (_read_json(Path(run_dir) / "summary.json") or {}).get("verdict", "unfinished")
    atomic_write_json(out / "comparison.json", {"runs": dict(zip(labels, map(str, run_dirs))), "cells": rows, "verdicts": verdicts})
    table = pd.DataFrame([r for r in rows if r["metric"] == "normalized_effect"])
    fig = go.Figure()
    for label in labels:
        t = table[table["checkpoint"] == label]
        fig.add_trace(
            go.Bar(
                name=label,
                x=[f"{s} / {k}" for s, k in zip(t["strategy"], t["kind"])],
                y=t["mean"],
                error_y={"type": "data", "symmetric": False, "array": t["ci_high"] - t["mean"], "arrayminus": t["mean"] - t["ci_low"]},
            )
        )
    fig.update_layout(barmode="group", title="mean normalized effect per strategy and latent-set kind (95% CI over pairs)", yaxis_title="normalized effect")
    items = "".join(f"<li><b>{html.escape(label)}</b>: {html.escape(v)}</li>" for label, v in verdicts.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>interp comparison</title><style>{STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head><body>
<h1>Patching sweeps compared across checkpoints</h1>
<h2>Verdicts</h2><ul>{items}</ul>
<h2>Effects</h2>{fig.to_html(full_html=False, include_plotlyjs=False)}
<p>Each run's own report.html has every figure; comparison.json holds these numbers.</p>
</body></html>
"""
    path = out / "comparison.html"
    path.write_text(page, encoding="utf-8")
    return path
