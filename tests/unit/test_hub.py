"""Hub ids: a hub-layout cache on disk (models--org--name/snapshots/<commit>, refs/<name>), read with
HF_HUB_OFFLINE=1. Nothing is downloaded; the gated base is a resolver that raises GatedRepoError."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from interp import CheckpointError, load_codi
from interp.cli import main

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
QUESTION = "2 + 2"


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay `files` (name -> source) out as huggingface_hub's cache does; point `refs` at `commit`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline hub cache, found through HF_HOME as a user's would be."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


@pytest.fixture
def gpt2_base_files(tiny_gpt2_codi, gpt2_tokenizer_dir, tmp_path) -> dict[str, Path]:
    _, base, _, _ = tiny_gpt2_codi
    base.config.save_pretrained(tmp_path / "base")
    return {
        "config.json": tmp_path / "base" / "config.json",
        "vocab.json": gpt2_tokenizer_dir / "vocab.json",
        "merges.txt": gpt2_tokenizer_dir / "merges.txt",
    }


def test_official_ids_resolve_to_snapshots_with_their_default_base(hub, tiny_gpt2_codi, gpt2_base_files):
    ref, _, tok, paths = tiny_gpt2_codi
    ckpt = add_snapshot(hub, "zen-E/CODI-gpt2", COMMIT_A, {"pytorch_model.bin": paths["bin"]})
    base = add_snapshot(hub, "gpt2", COMMIT_B, gpt2_base_files)
    model = load_codi("zen-E/CODI-gpt2", device="cpu")  # base defaults to gpt2
    opts = model.load_options
    assert opts["checkpoint"] == {
        "ref": "zen-E/CODI-gpt2",
        "path": str(ckpt / "pytorch_model.bin"),
        "repo_id": "zen-E/CODI-gpt2",
        "revision": None,
        "commit": COMMIT_A,
    }
    assert opts["base"]["path"] == str(base) and opts["base"]["commit"] == COMMIT_B
    assert (opts["model_type"], opts["lora_alpha"], opts["lora_rank"], opts["remove_eos"]) == ("gpt2", 32.0, 8, True)
    # the weights are the snapshot's: the reference's positions, and its generation
    torch.testing.assert_close(model.model.W_pos, ref.hf_model.transformer.wpe.weight.detach(), rtol=0, atol=0)
    gen = model.generate(QUESTION, max_new_tokens=3)
    latents, answer = ref.generate(tok(QUESTION)["input_ids"], bot=model.bot_id, eot=model.eot_id, eos=model.eos_id, num_latents=6, max_new_tokens=3)
    assert gen.answer_ids.tolist() == answer and (gen.latents - latents).abs().max() < 1e-4


def test_revision_pins_a_snapshot(hub, tiny_gpt2_codi, gpt2_base_files, tmp_path):
    ref, _, _, paths = tiny_gpt2_codi
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["prj.ln.bias"] += 1.0
    other = tmp_path / "other.bin"
    torch.save(state, other)
    add_snapshot(hub, "someone/codi-gpt2", COMMIT_A, {"pytorch_model.bin": paths["bin"]})
    add_snapshot(hub, "someone/codi-gpt2", COMMIT_B, {"pytorch_model.bin": other}, refs=("v2",))
    add_snapshot(hub, "gpt2", COMMIT_A, gpt2_base_files)
    bias = ref.prj.ln.bias.detach()
    for revision, commit, expected in ((None, COMMIT_A, bias), (COMMIT_B, COMMIT_B, bias + 1), ("v2", COMMIT_B, bias + 1)):
        model = load_codi("someone/codi-gpt2", "gpt2", revision=revision, device="cpu")
        assert model.load_options["checkpoint"]["commit"] == commit
        torch.testing.assert_close(model.prj.ln.bias.detach(), expected, rtol=0, atol=0)


def test_offline_miss_names_the_id_and_the_cache(hub, tiny_gpt2_codi, gpt2_base_files):
    _, _, _, paths = tiny_gpt2_codi
    with pytest.raises(CheckpointError) as info:
        load_codi("zen-E/CODI-llama3.2-1b-Instruct", revision="v9", device="cpu")
    message = str(info.value)
    assert message.startswith(f"checkpoint 'zen-E/CODI-llama3.2-1b-Instruct' (revision v9) is not in the Hugging Face cache {hub} and")
    assert "HF_HUB_OFFLINE" in message and "\n" not in message
    add_snapshot(hub, "zen-E/CODI-gpt2", COMMIT_A, {"pytorch_model.bin": paths["bin"]})
    with pytest.raises(CheckpointError, match=rf"^base 'gpt2' is not in the Hugging Face cache {hub} and the Hub cannot be reached"):
        load_codi("zen-E/CODI-gpt2", device="cpu")  # its default base is not cached


def test_gated_base_says_how_to_authenticate(hub, tiny_gpt2_codi, monkeypatch):
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    import interp.loading.hub as hub_module

    def gated(repo_id, **kwargs):
        raise GatedRepoError("403 Client Error", response=httpx2.Response(403, request=httpx2.Request("GET", "https://example.invalid")))

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_module, "snapshot_download", gated)
    _, _, _, paths = tiny_gpt2_codi
    with pytest.raises(CheckpointError) as info:
        load_codi(paths["bin"], "meta-llama/Llama-3.2-1B-Instruct", device="cpu")
    message = str(info.value)
    assert message.startswith("base 'meta-llama/Llama-3.2-1B-Instruct' is gated on the Hugging Face Hub")
    assert "huggingface-cli login" in message and "HF_TOKEN" in message and "\n" not in message


def test_base_is_required_where_no_default_exists(hub, tiny_gpt2_codi):
    _, _, _, paths = tiny_gpt2_codi
    with pytest.raises(CheckpointError, match="^base= is required for a local checkpoint"):
        load_codi(paths["bin"], device="cpu")
    with pytest.raises(CheckpointError, match="^no default base for checkpoint 'someone/other-codi'"):
        load_codi("someone/other-codi", device="cpu")
    with pytest.raises(CheckpointError, match="^checkpoint './missing/ckpt' does not exist"):
        load_codi("./missing/ckpt", "gpt2", device="cpu")


def test_cli_takes_hub_ids_and_shows_lora_alpha(hub, tiny_gpt2_codi, gpt2_base_files, capsys):
    _, _, _, paths = tiny_gpt2_codi
    add_snapshot(hub, "zen-E/CODI-gpt2", COMMIT_A, {"model.safetensors": paths["safetensors"]})
    add_snapshot(hub, "gpt2", COMMIT_A, gpt2_base_files)
    main(["generate", "--checkpoint", "zen-E/CODI-gpt2", "--device", "cpu", "--max-new-tokens", "2", "--lora-alpha", "16", QUESTION])
    out = capsys.readouterr()
    assert "loaded codi checkpoint zen-E/CODI-gpt2 on base gpt2: lora_alpha 16 (LoRA rank 8; alpha is not stored in checkpoints" in out.err
    assert "answer text:" in out.out
