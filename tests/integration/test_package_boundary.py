"""The installed package stands alone: `import interp` and the CLI's main job in a fresh interpreter
whose path holds neither the checkout's benchmarks/ nor tests/ (nothing under interp/ imports them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_interp_alone_runs_help_and_the_main_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    probe = (
        "import importlib.util, sys, interp; "
        "assert importlib.util.find_spec('benchmarks') is None and importlib.util.find_spec('tests') is None, 'checkout on the path'; "
        "import interp.cli, interp.analysis, interp.train; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('benchmarks', 'tests', 'nnsight', 'nbclient', 'hypothesis')); "  # (pytest: transformer_lens imports it where installed)
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True)
    interp_cli = [sys.executable, "-c", "import sys; from interp.cli import main; sys.exit(main())"]
    helped = subprocess.run([*interp_cli, "--help"], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    assert "generate" in helped.stdout and "bench" not in helped.stdout.split("positional arguments")[1].split("options")[0]
    ran = subprocess.run([*interp_cli, "run", "--quick", "--out", "quick"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert (tmp_path / "quick" / "report.html").is_file() and json.loads((tmp_path / "quick" / "summary.json").read_text())["validity"]["n_failed"] == 0
