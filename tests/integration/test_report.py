"""interp.report: report.html's content, its rendering in headless Chromium, and the PNG export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from importlib.util import find_spec
from pathlib import Path

import plotly.io as pio
import pytest

from interp.plots import load_results
from interp.report import export_pngs, report_figures, write_report
from tests.unit.test_plots import write_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path("/tmp/report.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = write_run(tmp_path_factory.mktemp("run") / "run1")
    write_report(out)
    return out


@pytest.fixture(scope="module")
def n_figures(run_dir) -> int:
    return len(report_figures(load_results(run_dir), json.loads((run_dir / "run.json").read_text())))


def test_report_content(run_dir, n_figures):
    page = (run_dir / "report.html").read_text()
    assert page.count("<script") == 1 + n_figures  # plotly.js once, then one call per figure
    assert page.count("Plotly.newPlot") == n_figures
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*\bhref=", page)  # self-contained: nothing fetched
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["verdict"].split(":")[0] in page
    assert "3 of 4 pairs passed every check" in page
    failed = re.findall(r'<td class="fail">([^<]*)</td>', page)
    assert failed == ["FAILED", "5.00e-01", "5.00e-01"]  # p1's all_inputs_is_clean under both strategies
    assert "<td>config.bootstrap</td>" in page and "<td>model.n_layers</td>" in page


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp}",
        "--virtual-time-budget=5000",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_chromium(run_dir, n_figures, tmp_path):
    url = (run_dir / "report.html").as_uri()
    dom = chromium("--enable-logging=stderr", "--v=0", "--dump-dom", url, tmp=tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Plotly.newPlot adds js-plotly-plot once a figure has rendered; each figure draws main-svg layers
    assert len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom.stdout)) == n_figures
    assert dom.stdout.count('class="main-svg"') >= 2 * n_figures
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    shot = chromium("--window-size=1400,3000", f"--screenshot={SCREENSHOT}", url, tmp=tmp_path / "profile2")
    assert shot.returncode == 0 and SCREENSHOT.stat().st_size > 10_000, shot.stderr[-2000:]


@pytest.mark.skipif(CHROMIUM is None or find_spec("kaleido") is None, reason="PNG export needs kaleido (pip install kaleido) and Chromium")
def test_export_pngs(run_dir, n_figures):
    paths = export_pngs(run_dir)
    assert len(paths) == n_figures
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_export_pngs_failure_only_warns(run_dir, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("no browser here\nsecond line")

    monkeypatch.setattr(pio, "write_images", broken)
    with pytest.warns(UserWarning, match=r"PNG export skipped \(RuntimeError: no browser here\)") as record:
        assert export_pngs(run_dir) == []
    assert "second line" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert write_report(run_dir).exists()  # the report never depends on the exporter
