"""Coconut checkpoints on the one engine, against the independent reference (tests/reference.py:
the official multi-pass KV-cache loop in plain transformers, forward hooks for patches)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

import interp
from interp import CheckpointError, Site, load_coconut, load_model
from interp.family import after_last_hash
from tests.reference import module_outputs, reference_coconut_patch
from tests.unit.test_hub import COMMIT_A, COMMIT_B, add_snapshot, hub  # noqa: F401  (hub: a fixture)

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a dumpus?"
CLEAN_Q, CORRUPTED_Q = "Every cat is a pet. Tom is a cat. Is Tom a pet?", "Every cat is a pet. Tom is a cow. Is Tom a pet?"
HOOKS = {"layer": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def case(request, tiny_gpt2_coconut, tiny_llama_coconut, one_thread):
    """(reference case, model loaded with 4 thoughts) for both bases."""
    c = tiny_gpt2_coconut if request.param == "gpt2" else tiny_llama_coconut
    return c, load_coconut(c.ckpt_dir, c.base_dir, num_latents=4, device="cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


# ----------------------------------------------------------------------------- the loop, exactly


@pytest.mark.parametrize("k", [0, 1, 4, 6])
def test_generate_matches_the_official_loop(case, k):
    c, model = case
    gen = model.generate(QUESTION, max_new_tokens=6, num_latents=k)
    thoughts, tokens = c.ref.generate_ids(c.ref.prompt_ids(c.tokenizer, QUESTION, k), 6)
    assert gen.latents.shape == (k, model.cfg.d_model)
    if k:
        assert rel(gen.latents, thoughts) < 1e-5
    assert gen.answer_ids.tolist()[: len(tokens)] == tokens
    assert gen.question_ids.tolist() == c.tokenizer.encode(QUESTION + "\n", add_special_tokens=True)
    assert model.num_latents == 4  # per call only


def test_markers_and_vocabulary_are_the_official_ones(case):
    c, model = case
    ids = [c.tokenizer.convert_tokens_to_ids(m) for m in ("<|start-latent|>", "<|end-latent|>", "<|latent|>")]
    assert (model.bot_id, model.eot_id, model.load_options["markers"]["latent"]) == tuple(ids)
    assert model.decode_vocab == model.cfg.d_vocab == len(c.tokenizer)  # Coconut decodes over the whole vocabulary
    assert model.pad_id == c.tokenizer.eos_token_id and model.family is interp.COCONUT


def test_teacher_forced_logits_and_cached_thoughts_match_the_reference(case):
    """The whole sequence through <|end-latent|> as the official forward computes it, and
    `hook_thought` at position p is the thought fed at p + 1 (the final-normed state at p)."""
    c, model = case
    ids = c.ref.prompt_ids(c.tokenizer, QUESTION, 4)
    embeds, logits = c.ref.forward_ids(ids)
    ours, cache = model.run_with_cache(QUESTION)
    n = logits.shape[1]
    assert rel(ours[0, :n], logits[0]) < 1e-5
    latent = c.ref.latent_positions(ids)
    thoughts = cache["hook_thought"][0]
    torch.testing.assert_close(thoughts[[p - 1 for p in latent]], embeds[0, latent], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(thoughts, cache["ln_final.hook_normalized"][0] * model.model.ln_final.w + (model.model.ln_final.b if model.cfg.normalization_type == "LN" else 0), rtol=1e-6, atol=1e-6)
    assert "prj.hook_in" not in model.model.hook_dict  # Coconut has no projection


def test_layout_names_the_coconut_sequence(case):
    c, model = case
    trace = model.trace(QUESTION)
    ids = c.ref.prompt_ids(c.tokenizer, QUESTION, 4)
    assert trace.tokens[: len(ids)].tolist()[: trace.position("bot") + 1] == ids[: len(ids) - 5]
    assert trace.tokens[trace.position("bot")] == model.bot_id and trace.tokens[trace.position("eot")] == model.eot_id
    assert trace.latent_positions == c.ref.latent_positions(ids)
    assert model.tokenizer.decode(trace.tokens[trace.position("prefix[0]") :].tolist()) == "###"
    rows = model.decode_latents(trace, k=2)
    full = model.forward(trace.input_embeds[None]).logits[0].detach()
    for t, row in enumerate(rows):
        top = full[trace.position(f"latent[{t}]")].softmax(-1).topk(1)
        assert row["state"][0] == (model.tokenizer.decode([int(top.indices[0])]), pytest.approx(float(top.values[0]), rel=1e-5))


# ----------------------------------------------------------------------------- patching


@pytest.fixture(scope="module")
def traces(case):
    c, model = case
    return c, model, model.trace(CLEAN_Q), model.trace(CORRUPTED_Q)


def reference_patch(c, model, clean, corrupted, module, layer, latents, strategy):
    """The reference's patch of the clean `module` output at `layer` into the corrupted run at latent indices."""
    k = model.num_latents
    tail = model.prefix_ids().tolist()
    clean_ids = c.ref.prompt_ids(c.tokenizer, CLEAN_Q, k)
    clean_out = module_outputs(c.ref, c.ref.sequence_embeds(clean_ids + tail, clean.latents), module, layer)
    positions = [corrupted.latent_positions[t] for t in latents]
    return reference_coconut_patch(c.ref, c.ref.prompt_ids(c.tokenizer, CORRUPTED_Q, k), corrupted.latents, clean_out, tail, module=module, layer=layer, positions=positions, strategy=strategy)


@pytest.mark.parametrize("strategy", ["parallel", "iterative", "feedback"])
@pytest.mark.parametrize("module,layer,latents", [("layer", 0, [0]), ("layer", 2, [1, 2]), ("attn", 1, [0]), ("mlp", 0, [1])])
def test_every_strategy_matches_the_hand_hooked_reference(traces, strategy, module, layer, latents):
    c, model, clean, corrupted = traces
    assert clean.seq_len == corrupted.seq_len
    result = interp.patch(model, corrupted, clean, f"blocks.{layer}.{HOOKS[module]}", latents, strategy)
    logits, fed = reference_patch(c, model, clean, corrupted, module, layer, latents, strategy)
    assert rel(result.answer_logits, logits) < 1e-5
    assert rel(result.latents, fed) < 1e-5
    if strategy != "parallel" and module == "layer":  # a residual patch visibly reaches the next thought
        assert (result.latents[latents[0] + 1] - corrupted.latents[latents[0] + 1]).abs().max() > 1e-3


def test_the_thought_hook_is_the_thought_map_path(traces):
    """Writing the clean thought at latent[t] (hook_thought) feeds it as thought t + 1: iterative and
    feedback agree exactly, parallel (fed thoughts held) changes nothing."""
    _, model, clean, corrupted = traces
    t = 1
    runs = {s: interp.patch(model, corrupted, clean, "hook_thought", [t], s) for s in ("parallel", "iterative", "feedback")}
    torch.testing.assert_close(runs["iterative"].latents[t + 1], clean.cache["hook_thought"][0, clean.position(f"latent[{t}]")], rtol=0, atol=1e-6)
    torch.testing.assert_close(runs["iterative"].answer_logits, runs["feedback"].answer_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(runs["parallel"].answer_logits, corrupted.answer_logits, rtol=0, atol=1e-5)
    # the same write as a plain TransformerLens hook through the real loop
    source = clean.cache["hook_thought"][0, clean.position(f"latent[{t}]")]
    hook = ("hook_thought", interp.at_positions(lambda act, hook: source.expand_as(act), corrupted.position(f"latent[{t}]")))
    logits = model.run_with_hooks(CORRUPTED_Q, fwd_hooks=[hook])
    torch.testing.assert_close(runs["iterative"].answer_logits, logits[0, corrupted.answer_position], rtol=0, atol=1e-5)


def test_validity_identities(traces):
    _, model, clean, corrupted = traces
    every = tuple(range(corrupted.seq_len))
    for strategy in ("parallel", "iterative"):
        nothing = interp.patch_sites(model, corrupted, clean, [], strategy)
        torch.testing.assert_close(nothing.answer_logits, corrupted.answer_logits, rtol=0, atol=1e-5)
        everything = interp.patch_sites(model, corrupted, clean, [Site("blocks.0.hook_resid_pre", every)], strategy)
        torch.testing.assert_close(everything.answer_logits, clean.answer_logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- loading


def test_codi_keeps_its_projection_hooks(tiny_codi):
    ref, base, tok, paths = tiny_codi
    model = load_model(paths["bin"], (base, tok), device="cpu")
    assert model.family is interp.CODI and model.load_options["family"] == "codi"
    _, cache = model.run_with_cache("Tom has 3 apples.")
    final = cache["prj.hook_in"][0]
    torch.testing.assert_close(cache["hook_thought"][0], ref.prj(final), rtol=1e-5, atol=1e-5)
    hidden = ref.prj[2](ref.prj[1](final))
    torch.testing.assert_close(cache["prj.hook_hidden"][0], hidden, rtol=1e-5, atol=1e-5)
    gen = model.generate("Tom has 3 apples.")
    t = cache["hook_thought"][0]
    layout = model.layout(len(gen.question_ids))
    torch.testing.assert_close(gen.latents[1:], t[layout.latent_positions[:-1]], rtol=1e-5, atol=1e-5)


def test_loads_by_file_by_directory_and_through_a_hub_cache(tiny_gpt2_coconut, tmp_path, hub):  # noqa: F811
    c = tiny_gpt2_coconut
    by_file = load_model(c.checkpoint, c.base_dir, device="cpu")
    assert by_file.family is interp.COCONUT
    several = tmp_path / "several"
    several.mkdir()
    shutil.copy(c.checkpoint, several / "checkpoint_12")
    torch.save({k: v * 0 for k, v in torch.load(c.checkpoint, weights_only=True).items()}, several / "checkpoint_2")
    by_dir = load_model(several, c.base_dir, device="cpu")  # the latest epoch: 12, not 2
    assert by_dir.load_options["checkpoint"]["path"].endswith("checkpoint_12")
    torch.testing.assert_close(by_dir.model.W_E, by_file.model.W_E, rtol=0, atol=0)
    add_snapshot(hub, "someone/coconut-gpt2", COMMIT_A, {"checkpoint_3": c.checkpoint})
    add_snapshot(hub, "gpt2", COMMIT_B, {p.name: p for p in c.base_dir.iterdir()})
    by_id = load_model("someone/coconut-gpt2", "gpt2", device="cpu")
    opts = by_id.load_options
    assert opts["checkpoint"]["repo_id"] == "someone/coconut-gpt2" and opts["checkpoint"]["commit"] == COMMIT_A
    assert opts["checkpoint"]["path"].endswith("checkpoint_3") and opts["base"]["commit"] == COMMIT_B
    torch.testing.assert_close(by_id.generate(QUESTION).latents, by_file.generate(QUESTION).latents, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def state(tiny_gpt2_coconut):
    return tiny_gpt2_coconut, dict(torch.load(tiny_gpt2_coconut.checkpoint, weights_only=True))


def test_missing_unused_and_misshaped_keys_are_named(state):
    c, sd = state
    missing = {k: v for k, v in sd.items() if k != "base_causallm.transformer.h.1.mlp.c_fc.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys: transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_coconut(missing, c.base_dir, device="cpu")
    with pytest.raises(CheckpointError, match=r"unused keys: transformer\.h\.7\.extra\.weight"):
        load_coconut({**sd, "base_causallm.transformer.h.7.extra.weight": torch.zeros(2)}, c.base_dir, device="cpu")
    with pytest.raises(CheckpointError, match=r"unused keys outside base_causallm\.\* and embedding\.weight: latent_proj\.weight"):
        load_coconut({**sd, "latent_proj.weight": torch.zeros(2)}, c.base_dir, device="cpu")
    bad = {**sd, "base_causallm.transformer.h.0.attn.c_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: transformer\.h\.0\.attn\.c_proj\.weight \(3, 3\) \(expected \(64, 64\)\)"):
        load_coconut(bad, c.base_dir, device="cpu")
    with pytest.raises(CheckpointError, match=r"^missing key embedding\.weight"):
        load_coconut({k: v for k, v in sd.items() if k != "embedding.weight"}, c.base_dir, device="cpu")
    with pytest.raises(CheckpointError, match=r"^embedding\.weight \(50260, 64\) differs from base_causallm\.transformer\.wte\.weight"):
        load_coconut({**sd, "embedding.weight": sd["embedding.weight"] + 1}, c.base_dir, device="cpu")


def test_wrong_vocabulary_says_how_many_rows_the_markers_make(state):
    c, sd = state
    short = {k: (v[:50257] if v.shape[:1] == (50260,) else v) for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"The embedding has 50257 rows; the base tokenizer with Coconut's three markers has 50260 tokens"):
        load_coconut(short, c.base_dir, device="cpu")


def test_a_tokenizer_with_only_some_markers_is_refused(state):
    from transformers import AutoConfig, AutoTokenizer

    c, sd = state
    tok = AutoTokenizer.from_pretrained(c.base_dir)
    tok.add_tokens("<|start-latent|>")
    base = (SimpleNamespace(config=AutoConfig.from_pretrained(c.base_dir)), tok)  # load_base reads a model's .config
    with pytest.raises(CheckpointError, match=r"holds <\|start-latent\|> but not <\|end-latent\|>, <\|latent\|>"):
        load_coconut(sd, base, device="cpu")


def test_family_is_read_from_the_keys(state, tiny_codi):
    c, sd = state
    plain = {k.removeprefix("base_causallm."): v for k, v in sd.items() if k != "embedding.weight"}
    with pytest.raises(CheckpointError, match=r"^checkpoint holds a plain causal LM .*a CoT, no-CoT or pause checkpoint of the Coconut code"):
        load_model(plain, c.base_dir, device="cpu")
    with pytest.raises(CheckpointError, match=r"^the state_dict is a Coconut checkpoint \(base_causallm\.\* keys\): load it with interp\.load_coconut"):
        interp.load_codi(sd, c.base_dir, device="cpu")
    _, _, _, paths = tiny_codi
    with pytest.raises(CheckpointError, match=r"is a CODI checkpoint \(codi\.\* and prj\.\* keys\): load it with interp\.load_codi"):
        load_coconut(paths["bin"], c.base_dir, device="cpu")
    with pytest.raises(CheckpointError, match=r"^the state_dict is a Coconut checkpoint; lora_alpha apply to CODI checkpoints only"):
        load_model(sd, c.base_dir, lora_alpha=16.0, device="cpu")
    with pytest.raises(CheckpointError, match=r"^base= is required for a Coconut checkpoint"):
        load_coconut(sd, None, device="cpu")


@pytest.mark.parametrize(
    "text,answer",
    [("### 18", 18.0), ("Tom is a terpus.\n### 1,234", 1234.0), ("### Tom is a lempus.", "Tom is a lempus."), ("no hash at all 7", "no hash at all 7"), ("###", None), ("### -2.5", -2.5)],
)
def test_the_official_answer_rule(text, answer):
    assert after_last_hash(text) == answer
