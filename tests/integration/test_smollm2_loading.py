"""load_codi + generate on real SmolLM2-135M-Instruct weights against the plain-HF/peft reference."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

QUESTIONS = ["Natalia sold clips to 48 of her friends in April. How many clips did she sell?", "What is 12 times 3?"]


def test_generate_matches_reference(smol_codi):
    ref, model, _, _ = smol_codi
    tok = model.tokenizer
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576 and model.cfg.n_key_value_heads == 3
    assert model.lora["rank"] == 16
    for q in QUESTIONS:
        gen = model.generate(q, max_new_tokens=8)
        ids = tok(q)["input_ids"]
        latents, answer = ref.generate(ids, bot=model.bot_id, eot=model.eot_id, eos=model.eos_id, num_latents=6, max_new_tokens=8)
        assert gen.answer_ids.tolist() == answer
        rel = (gen.latents - latents).norm(dim=-1) / latents.norm(dim=-1)
        assert rel.max() < 1e-4


def test_resid_post_matches_every_decoder_layer(smol_codi):
    ref, model, _, _ = smol_codi
    q = QUESTIONS[0]
    trace = model.trace(q, answer=48)
    tail = model.prefix_ids().tolist() + trace.answer_ids.tolist()
    embeds = ref.sequence_embeds(model.tokenizer(q)["input_ids"], trace.latents, tail, bot=model.bot_id, eot=model.eot_id)
    outputs = ref.layer_outputs(embeds)
    assert len(outputs) == 30
    for layer, expected in enumerate(outputs):
        got = trace.cache[f"blocks.{layer}.hook_resid_post"][0]
        scale = expected.abs().max()
        assert (got - expected).abs().max() / scale < 1e-4, layer


def test_safetensors_without_lm_head_loads_identically(smol_codi, tmp_path):
    from interp import load_codi
    from tests.factories import save_checkpoint

    ref, model, base_dir, _ = smol_codi
    save_checkpoint(ref, tmp_path / "model.safetensors", safetensors=True, drop_lm_head=True)
    other = load_codi(tmp_path, base_dir, device="cpu")
    for name, p in model.model.state_dict().items():
        torch.testing.assert_close(other.model.state_dict()[name], p, rtol=0, atol=0)
