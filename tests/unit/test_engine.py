"""The engine (prefix reuse, batched rows) against the naive specification (benchmarks/naive.py:
full recompute, no KV cache, one run at a time), every strategy and intervention, on a tiny model."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from transformer_lens import ActivationCache
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from benchmarks.naive import naive_patch
from interp import load_codi
from interp.data.arithmetic import arithmetic_pairs
from interp.engine import MAX_ROWS, BatchPatcher, Job, PositionCache, choose_batch_size
from interp.interventions import Add, Clean, Mean, Zero, as_intervention
from interp.kvcache import expand_cache
from interp.metrics import cache_similarity
from interp.model import fast_layout
from interp.patching import PatchError, Site, latent_sites
from interp.runio import read_jsonl
from interp.sweep import SweepConfig, run_sweep
from interp.trace import similarity_positions, trace_pair

TOL = 1e-5
MAX_NEW = 6  # decode length for these tests (the tiny random model never emits eos)
HOOKS = [
    ("blocks.1.hook_resid_post", None),
    ("blocks.0.hook_resid_pre", None),
    ("blocks.2.hook_attn_out", None),
    ("blocks.0.hook_mlp_out", None),
    ("blocks.1.attn.hook_z", 2),
]
LATENT_SETS = [(0,), (3,), (5,), (1, 4), (2, 3, 4, 5), (0, 1, 2, 3, 4, 5)]


@pytest.fixture(scope="module")
def model(tiny_codi):
    _, base, tok, paths = tiny_codi
    model = load_codi(paths["bin"], (base, tok), device="cpu")
    fast_layout(model)  # bitwise the same results (tested below); the reference runs faster
    return model


def reference(model, corrupted, clean, job, family=None, max_new_tokens=MAX_NEW):
    return naive_patch(model, corrupted, clean, job.sites, job.strategy, intervention=job.intervention, family=family, max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module")
def pair_traces(model):
    return trace_pair(model, arithmetic_pairs(1, seed=3)[0])


def assert_same(model, fast, ref, clean, family=None, positions=None):
    """A fast result equals the reference result: logits, fed latents, decoded answer, activations."""
    assert (fast.answer_logits - ref.answer_logits).abs().max() < TOL
    assert (fast.next_logits - ref.next_logits).abs().max() < TOL
    assert (fast.latents.cpu() - ref.latents.cpu()).abs().max() < TOL
    assert fast.generation.answer_ids.tolist() == ref.generation.answer_ids.tolist()
    assert fast.generation.text == ref.generation.text and fast.answer == ref.answer
    if family is not None:
        a, b = cache_similarity(fast.cache, clean.cache, family, positions), cache_similarity(ref.cache, clean.cache, family, positions)
        assert (a["cos"] - b["cos"]).abs().max() < TOL and (a["rel_l2"] - b["rel_l2"]).abs().max() < TOL
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.{family}"
            assert (fast.cache[name][0, positions] - ref.cache[name][0, positions]).abs().max() < TOL


@pytest.mark.parametrize("strategy,family", [("parallel", "hook_resid_post"), ("iterative", "hook_resid_post"), ("iterative", "attn.hook_z"), ("feedback", "hook_resid_post")])
def test_batches_mixing_hooks_and_latent_sets_match_reference(model, pair_traces, strategy, family):
    pt = pair_traces
    c = pt.corrupted
    sim_pos, _ = similarity_positions(c)
    jobs = [Job((latent_sites(c, hook, lat, head),), strategy) for i, (hook, head) in enumerate(HOOKS) for lat in LATENT_SETS[i % 2 :: 2]]
    jobs.append(Job((), strategy))  # patching nothing
    jobs.append(Job((latent_sites(c, "blocks.0.hook_resid_post", (1,)), latent_sites(c, "blocks.2.attn.hook_z", (4,), 0)), strategy))
    fast = BatchPatcher(model, [(c, pt.clean)], capture=family, capture_positions=[sim_pos], batch_size=7, max_new_tokens=MAX_NEW).run(jobs)
    for job, result in zip(jobs, fast):
        assert_same(model, result, reference(model, c, pt.clean, job, family), pt.clean, family, sim_pos)


@pytest.mark.parametrize("strategy", ["parallel", "iterative", "feedback"])
def test_interventions_match_reference(model, pair_traces, strategy):
    """Zero, Mean, Add and a user function, in one batch (rows of different interventions), vs the specification."""
    pt = pair_traces
    c = pt.corrupted
    other = trace_pair(model, arithmetic_pairs(2, seed=8)[1])
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    interventions = [Zero(), Mean([other.clean, other.corrupted, pt.clean]), Add(vector, 0.5), as_intervention(lambda act, clean: 0.5 * (act + clean))]
    jobs = [Job((latent_sites(c, hook, lat),), strategy, intervention=iv) for iv in interventions for hook, lat in [("blocks.1.hook_resid_post", (2,)), ("blocks.0.hook_attn_out", (0, 3))]]
    results = BatchPatcher(model, [(c, pt.clean)], batch_size=3, max_new_tokens=MAX_NEW).run(jobs)
    for job, result in zip(jobs, results):
        assert_same(model, result, reference(model, c, pt.clean, job), pt.clean)
    assert (results[0].next_logits - results[2].next_logits).abs().max() > 1e-3  # the interventions differ


def test_identical_jobs_run_once(model, pair_traces):
    """Jobs equal in pair, strategy, sites and intervention (a new Clean() or Zero() each time, or
    the same Mean object) are one run; an equal-valued but distinct Add is its own run. Every
    result still equals the specification."""
    pt = pair_traces
    c = pt.corrupted
    mean = Mean([pt.clean, pt.corrupted])
    vector = torch.ones(model.cfg.d_model)
    site = latent_sites(c, "blocks.1.hook_resid_post", (2,))
    ivs = [Clean(), Clean(), Zero(), Zero(), mean, mean, Add(vector), Add(vector.clone())]
    jobs = [Job((site,), s, intervention=iv) for iv in ivs for s in ("parallel", "iterative")]
    patcher = BatchPatcher(model, [(c, pt.clean)], max_new_tokens=MAX_NEW)
    results = patcher.run(jobs)
    assert patcher.stats["rows"] == 2 * 5  # Clean, Zero, the Mean object, two Add objects; per strategy
    assert len({id(r) for r in results}) == len(jobs)
    for job, result in zip(jobs, results):
        assert_same(model, result, reference(model, c, pt.clean, job), pt.clean)


def test_feedback_takes_only_the_projection(model, pair_traces):
    """feedback at latent 2: latent 3 is the projection of the patched state (as in iterative); later
    positions never see the patch, so the run equals an unpatched run fed feedback's latents."""
    pt = pair_traces
    c = pt.corrupted
    site = latent_sites(c, "blocks.1.hook_resid_post", (2,))
    fb, it = BatchPatcher(model, [(c, pt.clean)], max_new_tokens=MAX_NEW).run([Job((site,), "feedback"), Job((site,), "iterative")])
    torch.testing.assert_close(fb.latents[:4], it.latents[:4], rtol=0, atol=1e-5)  # latent 3: the same projection of the same patched state
    assert (fb.latents[3] - c.latents[3]).abs().max() > 1e-3 and (fb.latents[4:] - it.latents[4:]).abs().max() > 1e-4
    held = dataclasses.replace(c, input_embeds=c.input_embeds.clone(), latents=fb.latents)
    held.input_embeds[c.latent_positions] = fb.latents
    plain = BatchPatcher(model, [(held, pt.clean)], max_new_tokens=MAX_NEW).run([Job((), "parallel")])[0]
    torch.testing.assert_close(fb.next_logits, plain.next_logits, rtol=0, atol=1e-5)
    assert (fb.next_logits - it.next_logits).abs().max() > 1e-4  # iterative also lets later positions attend to the patch
    with pytest.raises(PatchError, match="feedback patches latent positions only"):
        BatchPatcher(model, [(c, pt.clean)]).run([Job((Site("blocks.1.hook_resid_post", (0,)),), "feedback")])


def test_batch_size_does_not_change_results(model, pair_traces):
    c = pair_traces.corrupted
    jobs = [Job((latent_sites(c, "blocks.1.hook_resid_post", lat),), s) for lat in LATENT_SETS for s in ("parallel", "iterative")]
    one = BatchPatcher(model, [(c, pair_traces.clean)], batch_size=1, max_new_tokens=MAX_NEW).run(jobs)
    many = BatchPatcher(model, [(c, pair_traces.clean)], batch_size=64, max_new_tokens=MAX_NEW).run(jobs)
    for a, b in zip(one, many):
        assert (a.next_logits - b.next_logits).abs().max() < TOL
        assert a.generation.answer_ids.tolist() == b.generation.answer_ids.tolist()


def test_batches_mixing_pairs_of_different_lengths(model):
    """Rows of three pairs whose questions (and answers) tokenize to different lengths share batches
    (left-padded prompts, right-padded tails); each row matches its own pair's reference."""
    pairs = sorted(arithmetic_pairs(12, steps=(2, 6), seed=11), key=lambda p: len(p.corrupted_question))
    traces = [trace_pair(model, p) for p in (pairs[0], pairs[len(pairs) // 2], pairs[-1])]
    assert len({pt.corrupted.latent_positions[0] for pt in traces}) == 3
    sites = [("blocks.0.hook_resid_post", (0,)), ("blocks.2.hook_mlp_out", (4,)), ("blocks.1.hook_resid_post", (0, 1, 2, 3, 4, 5)), ("blocks.1.hook_resid_pre", (2,))]
    jobs = [Job((latent_sites(pt.corrupted, h, lat),), s, pair=i) for h, lat in sites for s in ("parallel", "iterative", "feedback") for i, pt in enumerate(traces)]
    jobs.append(Job((Site("blocks.1.hook_resid_post", (3,)),), "iterative", pair=2))  # a site in the question, rows of other pairs left-padded
    jobs.append(Job((Site("blocks.0.hook_resid_post", (2,)),), "parallel", pair=0))
    positions = [similarity_positions(pt.corrupted)[0] for pt in traces]
    patcher = BatchPatcher(model, [(pt.corrupted, pt.clean) for pt in traces], capture="hook_resid_post", capture_positions=positions, batch_size=5, max_new_tokens=MAX_NEW)
    results = patcher.run(jobs)
    for job, result in zip(jobs, results):
        pt = traces[job.pair]
        assert_same(model, result, reference(model, pt.corrupted, pt.clean, job, "hook_resid_post"), pt.clean, "hook_resid_post", positions[job.pair])
    with pytest.raises(PatchError, match="pair 3"):
        patcher.run([Job((), "parallel", pair=3)])
    with pytest.raises(PatchError, match="one list per pair"):
        BatchPatcher(model, [(pt.corrupted, pt.clean) for pt in traces], capture="hook_resid_post", capture_positions=positions[:1])


@pytest.mark.parametrize("off", ["prefix_reuse", "drafts", "lookup", "dedup", "parallel_skip"])
def test_each_shortcut_switched_off_gives_the_same_results(model, off, monkeypatch):
    """`EngineOptions`: with any shortcut off, every row of a batch mixing pairs of different lengths, sites
    in the question and duplicate jobs equals the default engine's (every fourth also the reference's); and
    the switch does switch (rows or forward passes change)."""
    from interp.engine import EngineOptions

    pairs = sorted(arithmetic_pairs(12, steps=(2, 6), seed=11), key=lambda p: len(p.corrupted_question))
    traces = [trace_pair(model, p) for p in (pairs[0], pairs[-1])]
    sites = [("blocks.1.hook_resid_post", (0,)), ("blocks.2.hook_mlp_out", (1, 2, 3, 4, 5))]
    jobs = [Job((latent_sites(pt.corrupted, h, lat),), s, pair=i) for h, lat in sites for s in ("parallel", "iterative") for i, pt in enumerate(traces)]
    jobs += [jobs[0], Job((Site("blocks.1.hook_resid_post", (2,)),), "iterative", pair=1), Job((latent_sites(traces[1].corrupted, "blocks.0.hook_resid_post", (2,)),), "feedback", pair=1)]
    positions = [similarity_positions(pt.corrupted)[0] for pt in traces]
    pairs_ = [(pt.corrupted, pt.clean) for pt in traces]
    calls: list[tuple[int, int]] = []  # (start_layer, columns) of every forward pass
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda embeds, **kw: calls.append((kw.get("start_layer", 0), embeds.shape[1])) or forward(embeds, **kw))
    import interp.model

    feed, lookups = interp.model.draft_feed, []  # the lookup switch each decode pass's feed is made with
    monkeypatch.setattr(interp.model, "draft_feed", lambda *a: lookups.append(a[4]) or feed(*a))
    runs, lookup_args = {}, {}
    for name, options in (("on", None), ("off", EngineOptions(**{off: False}))):
        calls.clear()
        lookups.clear()
        patcher = BatchPatcher(model, pairs_, capture="hook_resid_post", capture_positions=positions, batch_size=4, max_new_tokens=MAX_NEW, options=options)
        runs[name] = (patcher.run(jobs), patcher.stats["rows"], list(calls))
        lookup_args[name] = set(lookups)
    for i, (job, result) in enumerate(zip(jobs, runs["off"][0])):  # the default engine's rows are checked against the reference above
        pt = traces[job.pair]
        expected = reference(model, pt.corrupted, pt.clean, job, "hook_resid_post") if i % 4 == 0 else runs["on"][0][i]
        assert_same(model, result, expected, pt.clean, "hook_resid_post", positions[job.pair])
    (_, rows_on, calls_on), (_, rows_off, calls_off) = runs["on"], runs["off"]
    columns = lambda calls: sum(n for _, n in calls)  # noqa: E731
    if off == "dedup":
        assert rows_off == rows_on + 1
    elif off == "parallel_skip":
        assert max(f for f, _ in calls_on) > 0 and max(f for f, _ in calls_off) == 0
    elif off == "lookup":  # switched off in every decode pass (its effect on passes: tests/unit/test_decode.py)
        assert lookup_args == {"on": {True}, "off": {False}}
    else:  # prefix_reuse: more columns recomputed; drafts: more, narrower decode passes
        assert columns(calls_off) > columns(calls_on) if off == "prefix_reuse" else len(calls_off) > len(calls_on)


def test_parallel_rows_start_at_their_first_site_block(model):
    """Parallel runs compute only the blocks from their sites' lowest one up (the blocks below hold
    the corrupted run's own values at every column). Rows of pairs whose tails differ in length
    (answers of 1 and 9 digits: right-padded tails) and prompts (left padding) share batches whose
    first block is 1 or 2; captures below it come from the corrupted trace. Each row matches the
    specification, which runs every block."""
    questions = [("7 +5 *3 -2", "8 +5 *3 -2", "7"), ("Tom has 3 apples and buys 5 more.", "Tom has 4 apples and buys 5 more.", "123456789")]
    traces = [(model.trace(c, answer=a), model.trace(k, answer=a)) for k, c, a in questions]
    assert len({t[0].seq_len - t[0].layout.eot for t in traces}) == 2 and len({t[0].layout.n_prompt for t in traces}) == 2
    sites = [("blocks.1.hook_resid_post", (0,)), ("blocks.2.hook_mlp_out", (3,)), ("blocks.1.attn.hook_z", (1, 2)), ("blocks.2.hook_resid_pre", (5,))]
    jobs = [Job((latent_sites(c, h, lat),), "parallel", pair=i) for h, lat in sites for i, (c, _) in enumerate(traces)]
    positions = [[c.latent_positions[2], c.seq_len - 1] for c, _ in traces]
    patcher = BatchPatcher(model, traces, capture="hook_resid_post", capture_positions=positions, batch_size=4, max_new_tokens=MAX_NEW)
    for job, result in zip(jobs, patcher.run(jobs)):
        corrupted, clean = traces[job.pair]
        assert_same(model, result, reference(model, corrupted, clean, job, "hook_resid_post"), clean, "hook_resid_post", positions[job.pair])


def test_sites_before_the_latents_run_and_leave_the_traces_alone(model, pair_traces):
    pt = pair_traces
    c = pt.corrupted
    before = c.input_embeds.clone(), pt.clean.input_embeds.clone()
    every = Site("blocks.0.hook_resid_pre", tuple(range(c.seq_len)))
    jobs = [Job((every,), "parallel"), Job((every,), "iterative"), Job((latent_sites(c, "blocks.1.hook_resid_post", (2,)),), "iterative")]
    patcher = BatchPatcher(model, [(c, pt.clean)], max_new_tokens=MAX_NEW)
    results = patcher.run(jobs)
    assert torch.equal(c.input_embeds, before[0]) and torch.equal(pt.clean.input_embeds, before[1])
    for r in results[:2]:  # every input clean: the clean run
        assert (r.next_logits - pt.clean.next_logits).abs().max() < 1e-4
    copy_c = dataclasses.replace(c, input_embeds=c.input_embeds.clone())
    assert_same(model, results[2], reference(model, copy_c, pt.clean, jobs[2]), pt.clean)


def test_bad_jobs_raise(model, pair_traces):
    c = pair_traces.corrupted
    patcher = BatchPatcher(model, [(c, pair_traces.clean)])
    with pytest.raises(PatchError, match="unknown strategy"):
        patcher.run([Job((), "sideways")])
    with pytest.raises(PatchError, match="unknown hook"):
        patcher.run([Job((Site("blocks.1.hook_nonsense", (c.latent_positions[0],)),), "parallel")])
    with pytest.raises(PatchError, match="out of range"):
        patcher.run([Job((Site("blocks.1.hook_resid_post", (c.seq_len + 3,)),), "parallel")])
    with pytest.raises(PatchError, match="capture positions"):
        BatchPatcher(model, [(c, pair_traces.clean)], capture="hook_resid_post", capture_positions=[[0]])


@pytest.mark.parametrize("stop", [False, True])
def test_decode_reuses_the_teacher_forced_prefix_where_the_model_follows_it(model, stop):
    """Make the model's own greedy output the teacher-forced prefix, so that the decode takes the
    teacher-forced path for some rows and leaves it (masking the rest of it) for others; with
    `stop`, the token the model repeats is eos, so rows also end inside the teacher-forced chunk."""
    q_clean, q_corrupted = "7 +5 *3 -2", "8 +5 *3 -2"
    ids = model.generate(q_corrupted, max_new_tokens=8).answer_ids.tolist()
    tok = copy.deepcopy(model.tokenizer)
    k = next(k for k in (4, 3, 2) if tok(tok.decode(ids[:k]), add_special_tokens=False)["input_ids"] == ids[:k])
    if stop:
        tok.eos_token = tok.convert_ids_to_tokens(ids[1])
    m = dataclasses.replace(model, tokenizer=tok, answer_prefix=tok.decode(ids[:k]))
    clean, corrupted = m.trace(q_clean), m.trace(q_corrupted)
    assert corrupted.tokens[corrupted.position("eot") + 1 :].tolist() == ids[:k]
    # "clean" activations pointing elsewhere (features rolled), so that patches change the answer
    other = {n: v.roll(7, dims=-1) if n.endswith("hook_resid_post") else v for n, v in clean.cache.cache_dict.items()}
    clean = dataclasses.replace(clean, cache=ActivationCache(other, m.model))
    jobs = [Job((latent_sites(corrupted, f"blocks.{l}.hook_resid_post", lat),), s) for l, lat in [(0, (0,)), (1, (4,)), (0, (5,)), (1, (0, 1, 2, 3, 4, 5))] for s in ("parallel", "iterative")]
    jobs.append(Job((), "parallel"))
    patcher = BatchPatcher(m, [(corrupted, clean)], batch_size=8, max_new_tokens=8)
    results = patcher.run(jobs)
    unpatched = results[-1].generation.answer_ids.tolist()
    assert unpatched == (ids[:2] if stop else ids[:8])
    forced = corrupted.tokens[corrupted.position("eot") + 1 :].tolist()
    accepted = [next((i for i, (a, b) in enumerate(zip(r.generation.answer_ids.tolist(), forced)) if a != b or a == m.eos_id), len(forced)) for r in results]
    if stop:  # eos inside the teacher-forced chunk for some rows, decoding on for the others
        assert max(accepted) == 1 and {len(r.generation.answer_ids) for r in results} == {2, 8}
    else:  # rows leave the teacher-forced prefix at different points, or follow it to its end
        assert max(accepted) == k and min(accepted) < k
    for job, r in zip(jobs, results):
        assert_same(m, r, reference(m, corrupted, clean, job, max_new_tokens=8), clean)


def test_run_sweep_rows_do_not_depend_on_batch_size(model, tmp_path):
    pairs = arithmetic_pairs(2, seed=5)  # the engine batches both pairs' units together
    config = SweepConfig(kinds=("single", "all"), layers=(1,), bootstrap=50)
    run_sweep(model, pairs, tmp_path / "one", config, progress=False, batch_size=1)
    run_sweep(model, pairs, tmp_path / "many", config, progress=False)
    one = {r["test_id"]: r for r in read_jsonl(tmp_path / "one" / "results.jsonl")}
    many = {r["test_id"]: r for r in read_jsonl(tmp_path / "many" / "results.jsonl")}
    assert set(one) == set(many) and len(many) == 2 * 7 * 3
    for tid, a in one.items():
        b = many[tid]
        assert set(a) == set(b)
        for key, value in a.items():
            if isinstance(value, float) and not math.isnan(value):
                assert b[key] == pytest.approx(value, abs=1e-4, rel=1e-4), (tid, key)  # normalized effects divide by small gaps
            elif isinstance(value, list) and value and isinstance(value[0], (float, list)):
                x, y = torch.tensor(value, dtype=torch.float64), torch.tensor(b[key], dtype=torch.float64)
                assert (x - y).abs().max() < TOL, (tid, key)
            elif not isinstance(value, float):
                assert b[key] == value, (tid, key)


def test_expand_cache_rows_equal_the_one_row_cache(model, pair_traces):
    c = pair_traces.corrupted
    eot = c.position("eot")
    one = TransformerLensKeyValueCache.init_cache(model.cfg, model.device, 1)
    with torch.no_grad():
        model.forward(c.input_embeds[None, :eot], kv_cache=one)
        one.freeze()
        many = expand_cache(one, 4, eot - 2)
        assert many.entries[0].past_keys.shape[:2] == (4, eot - 2) and many.previous_attention_mask.shape == (4, eot - 2)
        out = model.forward(c.input_embeds[None, eot - 2 :].repeat(4, 1, 1), kv_cache=many).logits
        full = model.forward(c.input_embeds[None]).logits[0, eot - 2 :]
    assert (out - full).abs().max() < TOL
    assert one.entries[0].past_keys.shape[1] == eot  # the source is untouched


def test_logit_positions_and_fast_layout_change_no_value(model, pair_traces):
    embeds = pair_traces.corrupted.input_embeds[None]
    with torch.no_grad():
        fast_layout(model, enable=False)
        full = model.forward(embeds).logits
        assert fast_layout(model) > 0 and fast_layout(model) == 0  # idempotent
        assert torch.equal(model.forward(embeds).logits, full)  # bitwise
        some = model.forward(embeds, logit_positions=[2, 5, embeds.shape[1] - 1]).logits
        none = model.forward(embeds, logit_positions=[]).logits
        assert fast_layout(model, enable=False) > 0 and all(p.is_contiguous() for p in model.model.parameters())
    assert (some - full[:, [2, 5, embeds.shape[1] - 1]]).abs().max() < 1e-6 and none.shape[1] == 0
    with pytest.raises(ValueError):
        model.forward(embeds, logit_positions=[0], with_cache=True)


def test_unembed_at_logit_positions_adds_a_nonzero_bias_and_runs_its_hooks(model, pair_traces):
    """The unembedding at `logit_positions` skips only an all-zero b_U: a non-zero one is added (final-normed
    state @ W_U + b_U, by hand), and unembed.hook_in / hook_out still see (and can change) the values."""
    embeds = pair_traces.corrupted.input_embeds[None]
    positions = [1, embeds.shape[1] - 1]
    seen: dict[str, tuple] = {}
    hooks = [("unembed.hook_in", lambda act, hook: seen.__setitem__("in", act.shape)), ("unembed.hook_out", lambda act, hook: act * 2)]
    b_U = model.model.unembed.b_U
    with torch.no_grad():
        for bias in (torch.zeros_like(b_U), torch.linspace(-1, 1, b_U.numel())):
            b_U.copy_(bias)
            out = model.forward(embeds, logit_positions=positions, fwd_hooks=hooks)
            by_hand = 2 * (out.final[:, positions] @ model.model.W_U + bias)
            assert (out.logits - by_hand).abs().max() < 1e-5 and seen["in"] == (1, len(positions), model.cfg.d_model)
        b_U.zero_()


def test_greedy_ids_slice_by_slice_are_the_argmax_of_the_logits(model, pair_traces, monkeypatch):
    """`forward(greedy=True)` merges the vocabulary in slices (7 ids here, so the merge runs): its ids are
    the argmax over ids < decode_vocab of final @ W_U + b_U, by hand, the first id on a tie across slices
    (id 3 and 17 given the same unembedding column), and through a hook on unembed.hook_out."""
    import interp.model

    monkeypatch.setattr(interp.model, "UNEMBED_CHUNK", 7)
    embeds = pair_traces.corrupted.input_embeds[None]
    positions = list(range(embeds.shape[1]))
    unembed = model.model.unembed
    saved = unembed.W_U.detach().clone()
    with torch.no_grad():
        try:
            for bias in (torch.zeros_like(unembed.b_U), torch.linspace(-3, 3, unembed.b_U.numel())):
                unembed.b_U.copy_(bias)
                final = model.forward(embeds, logit_positions=[]).final
                unembed.W_U[:, 3] = 100 * final[0, 0] / final[0, 0].norm() ** 2  # id 3 wins at position 0 by a logit of ~100 ...
                unembed.W_U[:, 17], unembed.b_U[17] = unembed.W_U[:, 3], unembed.b_U[3]  # ... tied with id 17, two slices on
                by_hand = (final @ unembed.W_U + unembed.b_U)[..., : model.decode_vocab].argmax(dim=-1)
                got = model.forward(embeds, logit_positions=positions, greedy=True)
                assert got.logits is None and torch.equal(got.greedy, by_hand) and int(got.greedy[0, 0]) == 3
                hooked = model.forward(embeds, logit_positions=positions, greedy=True, fwd_hooks=[("unembed.hook_out", lambda act, hook: -act)])
                assert torch.equal(hooked.greedy, (-(final @ unembed.W_U + unembed.b_U))[..., : model.decode_vocab].argmax(dim=-1))
        finally:
            unembed.W_U.copy_(saved)
            unembed.b_U.zero_()
    with pytest.raises(ValueError, match="logit_positions"):
        model.forward(embeds, greedy=True)


def test_batch_size_choice(model):
    assert choose_batch_size(model, 40, 20, 8, override=3) == 3
    with pytest.raises(ValueError):
        choose_batch_size(model, 40, 20, 8, override=0)
    assert 1 <= choose_batch_size(model, 40, 20, 8) <= MAX_ROWS["cpu"]


def test_position_cache_marks_unrecorded_positions():
    cache = PositionCache({"blocks.0.hook_resid_post": torch.ones(2, 3)}, [1, 4], seq_len=6)
    full = cache["blocks.0.hook_resid_post"]
    assert full.shape == (1, 6, 3) and torch.isnan(full[0, [0, 2, 3, 5]]).all() and (full[0, [1, 4]] == 1).all()
    assert "blocks.0.hook_resid_post" in cache and list(cache.keys()) == ["blocks.0.hook_resid_post"]


def test_bfloat16_runs_close_to_the_reference(tiny_codi):
    _, base, tok, paths = tiny_codi
    model = load_codi(paths["bin"], (base, tok), device="cpu", dtype=torch.bfloat16)
    pt = trace_pair(model, arithmetic_pairs(1, seed=3)[0])
    c = pt.corrupted
    jobs = [Job((latent_sites(c, "blocks.1.hook_resid_post", lat),), s) for lat in [(0,), (2, 3)] for s in ("parallel", "iterative")]
    results = BatchPatcher(model, [(c, pt.clean)], capture="hook_resid_post", capture_positions=[similarity_positions(c)[0]], max_new_tokens=MAX_NEW).run(jobs)
    for job, r in zip(jobs, results):
        ref = reference(model, c, pt.clean, job)
        assert r.next_logits.dtype == torch.bfloat16 and torch.isfinite(r.next_logits).all()
        scale = ref.next_logits.float().abs().max()
        assert (r.next_logits.float() - ref.next_logits.float()).abs().max() < 0.05 * scale
