"""`analyze`: every analysis on one set of problems into `analysis.json`, and its `report.html`.

analysis.json holds `meta` (problems, options, provenance) and one list of rows per analysis:
- `lens`: {layer, position, target, top1_rate, mean_rank, mean_prob, n}; `lens_top`: {layer,
  position, top: [[token, rate], ...]} (interp.analysis.lens);
- `probes`: {layer, position, target, accuracy, control_accuracy, selectivity, majority, n_train,
  n_test} (interp.analysis.probes);
- `attention`: {layer, head, query, key, weight} (interp.analysis.attention);
- `knockout`: {edge, cut, layer, accuracy, baseline_accuracy, changed, n}.
Layers: -1 is the input embedding (`blocks.0.hook_resid_pre`), L is `blocks.L.hook_resid_post`.
Positions and keys are named as `Trace.position_names` names them (`bot`, `latent[2]`, `eot`;
`answer` = the last prefix token; `question` = every question token, summed). Targets: `step[k]`
(k from 1) and `answer`. The file is rewritten atomically after each analysis; a rerun with the
same problems and options skips the analyses it holds.

The directory is a run directory (`interp.runio.open_run`, as for sweeps): `run.json` holds the
fingerprint (the model's content and loading options, the problems, the options, versions),
compared field by field on resume, and a lock admits one writer; `force_new` starts over.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs

from interp.analysis.activations import Activations, Problem, collect
from interp.analysis.attention import attention_rows, knockout_rows
from interp.analysis.figures import attention_heatmap, knockout_heatmap, lens_heatmap, probe_heatmap
from interp.analysis.lens import logit_lens
from interp.analysis.probes import probe_rows
from interp.model import LatentModel
from interp.runio import ANALYSIS, atomic_write_json, finite, model_fingerprint, open_run, versions

ANALYSES = ("lens", "probes", "attention", "knockout")

DEFINITIONS = {
    "layer": "the residual stream read out: <code>embed</code> = the input embedding (<code>blocks.0.hook_resid_pre</code>; "
    "at a latent, the fed latent), L = the output of block L (<code>blocks.L.hook_resid_post</code>).",
    "position": "<code>bot</code>, <code>latent[t]</code> (0-based), <code>eot</code>, "
    '<code>answer</code> = the last token of the answer prefix ("The answer is:"), whose next token is the answer\'s first.',
    "target": "<code>step[k]</code> = the value after step k of the problem's solution (k from 1; the last step is the answer), "
    "<code>answer</code> = the answer; scored by the first token of the value as written.",
    "top1_rate": "fraction of problems where the target's token is the top token of unembed(ln_final(residual)) over ids &lt; eot.",
    "mean_rank": "mean rank of the target's token in that distribution (1 = top); mean_prob: its mean probability.",
    "accuracy": "held-out accuracy of a logistic-regression probe (standardized residual, one class per value, 70/30 split, seed 0).",
    "control_accuracy": "the same probe on labels shuffled across problems (Hewitt &amp; Liang's control task); selectivity = accuracy - control_accuracy.",
    "majority": "held-out accuracy of always answering the most frequent training label.",
    "weight": "attention weight from the query position to the key group (question = summed over the question tokens, "
    "prefix = over the answer prefix), mean over problems (and over heads in the figure).",
    "knockout accuracy": "accuracy of the real latent loop and greedy answer with the pre-softmax scores of the cut edges "
    "(query group -> strictly earlier key group) set to -inf at the layer shown (<code>all</code> = every layer); "
    "latents are regenerated under the cut. <code>answer</code> as a query group = eot and every position after it. "
    "changed = fraction of answers that differ from the unablated run.",
}


def problems_fingerprint(problems: Sequence[Problem]) -> str:
    text = json.dumps([[p.question, p.answer, list(p.intermediates)] for p in problems])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def analyze(
    model: LatentModel,
    problems: Sequence[Problem],
    out_dir: str | Path,
    *,
    quick: bool = False,
    provenance: dict[str, Any] | None = None,
    batch_size: int = 64,
    log=print,
    force_new: bool = False,
) -> dict[str, Any]:
    """Run (or resume) every analysis into `out_dir/analysis.json`, write `out_dir/report.html`;
    returns the analysis dict. `quick`: knockout at all layers at once only (not layer by layer).
    A directory holding another model's, problems' or options' analysis is refused (UsageError
    naming the differing fields) unless `force_new`, which wipes it first."""
    meta = {
        "problems": len(problems),
        "problems_sha256": problems_fingerprint(problems),
        "quick": quick,
        "n_layers": model.cfg.n_layers,
        "num_latents": model.num_latents,
        "provenance": provenance or {},
    }
    fingerprint = {
        "model": model_fingerprint(model),
        "problems": {"n": len(problems), "sha256": meta["problems_sha256"]},
        "options": {"quick": quick},
        "versions": versions(),
    }
    with open_run(out_dir, fingerprint, {"analysis": ANALYSES, "provenance": finite(provenance or {})}, force_new=force_new) as run:
        path = run.path / ANALYSIS
        data = _read(path) or {"meta": meta}
        todo = [a for a in ANALYSES if a not in data]
        if todo:
            log(f"analyses to run: {', '.join(todo)} on {len(problems)} problems" + (f" (done: {', '.join(a for a in ANALYSES if a in data)})" if len(todo) < len(ANALYSES) else ""))
            acts = collect(model, problems, batch_size)
            data["meta"]["accuracy"] = sum(acts.correct) / len(problems)
            for name in todo:
                start = time.perf_counter()
                data.update(_run_one(name, model, acts, quick, batch_size))
                atomic_write_json(path, data)
                log(f"{name}: done ({time.perf_counter() - start:.1f} s)")
        write_analysis_report(run.path)
        run.finish(None)
    return data


def _run_one(name: str, model: LatentModel, acts: Activations, quick: bool, batch_size: int) -> dict[str, Any]:
    if name == "lens":
        lens, top = logit_lens(model, acts)
        return {"lens": lens, "lens_top": top}
    if name == "probes":
        return {"probes": probe_rows(acts)}
    if name == "attention":
        return {"attention": attention_rows(acts)}
    return {"knockout": knockout_rows(model, acts.problems, acts.generations, per_layer=not quick, batch_size=batch_size)}


def analysis_figures(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, figure) per analysis present in an analysis dict."""
    n = data["meta"]["problems"]
    figs = []
    if data.get("lens"):
        figs.append(("analysis_lens", lens_heatmap(data["lens"], n)))
    if data.get("probes"):
        figs.append(("analysis_probes", probe_heatmap(data["probes"], n)))
    if data.get("attention"):
        figs.append(("analysis_attention", attention_heatmap(data["attention"], n)))
    if data.get("knockout"):
        figs.append(("analysis_knockout", knockout_heatmap(data["knockout"])))
    return figs


def definitions_html() -> str:
    return "<dl>" + "".join(f"<dt><b>{html.escape(k)}</b></dt><dd>{v}</dd>" for k, v in DEFINITIONS.items()) + "</dl>"


def analysis_section(data: dict[str, Any]) -> str:
    """The HTML of the analyses (definitions, then one figure each), plotly.js not included."""
    meta = data["meta"]
    accuracy = f"; the model answers {meta['accuracy']:.1%} of them correctly" if "accuracy" in meta else ""
    divs = "".join(f'<div class="figure" id="{name}">{fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}")}</div>' for name, fig in analysis_figures(data))
    return f"<p>{meta['problems']} problems{accuracy}.</p><h3>Definitions</h3>{definitions_html()}{divs}"


def write_analysis_report(out_dir: str | Path) -> Path:
    """`out_dir/report.html` from `out_dir/analysis.json`: definitions and a heatmap per analysis, plotly.js inline."""
    out = Path(out_dir)
    data = _read(out / "analysis.json")
    if data is None:
        raise FileNotFoundError(f"no analysis.json in {out}; run `interp analyze --out {out}` first")
    from interp.report import model_line

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>interp analysis: {html.escape(out.name)}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 1em auto; padding: 0 1.5em; max-width: 1400px; color: #222; }} dd {{ margin-bottom: 0.4em; }}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>What the latents hold: {html.escape(out.name)}</h1>
<p>{html.escape(model_line(data["meta"].get("provenance", {}).get("load_options", {})))}</p>
{analysis_section(data)}
<h2>Provenance</h2><pre>{html.escape(json.dumps(data["meta"], indent=1))}</pre>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
