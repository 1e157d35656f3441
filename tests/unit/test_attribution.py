"""Attribution patching through the latent loop (`interp.attribution`), graded against the exact engine.

Every model is float64. For each strategy, the AtP estimate at a site is the derivative of the exact
engine's metric along the patch direction: the engine patches `act + eps * (clean - act)`, and the
central difference at eps = +-1e-4 must equal the estimates to 1e-6 of the largest effect (normwise),
and the Richardson-extrapolated central difference from eps = 1e-3, 2e-3 each site's estimate to 1e-6
of its own value (sites of at least 1% of the largest effect and 1e-6), at sites in the question, at
bot, at every latent, at eot and in the answer, for every hook family, on CODI (tiny Llama-3.2, tiny
GPT-2) and Coconut (tiny GPT-2, tiny Llama-3.2).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from interp import load_coconut, load_codi
from interp.attribution import attribute, decompose, resolve_hooks, verify_top_k
from interp.data import align_to_model
from interp.data.arithmetic import arithmetic_pairs
from interp.data.pairs import NumberChange, Pair
from interp.engine import BatchPatcher, Job, PatchError, Site
from interp.interventions import Add, as_intervention
from interp.metrics import kl_divergence
from interp.patching import patch_sites
from interp.trace import PairTraces, trace_pair

EPS = 1e-4
#: the per-site check's step: in float64 the engine's metric carries rounding noise of ~1e-15, i.e. up to
#: ~1e-11 in a central difference at 1e-4, more than 1e-6 of the smaller effects (~1e-5); at 1e-3 the noise
#: is 10x smaller, and Richardson extrapolation (4 D(h) - D(2h)) / 3 removes the eps^2 truncation error
#: (which reaches 5e-6 relative at 1e-3 on the tiny GPT-2 CODI)
EPS_SITE = 1e-3
REL = 1e-6
#: per-site relative errors are taken against max(|finite difference|, FLOOR * the largest one of the strategy,
#: ABS_FLOOR): the central difference at 1e-3 carries ~1e-13 of float64 rounding noise, so effects under 1e-6
#: (the tiny Coconut GPT-2's feedback effects reach 2e-5, many are ~1e-7) are graded by the normwise check only
FLOOR = 1e-2
ABS_FLOOR = 1e-6
BLOCK_FAMILIES = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z"]
COCONUT_QUESTIONS = ("Every cat is a pet. Tom is a cat. Is Tom a pet?", "Every cat is a pet. Tom is a cow. Is Tom a pet?")
#: max relative error per (model, strategy), printed at the end of the module (pytest -s)
ERRORS: dict[tuple[str, str], tuple[float, float, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    for (name, strategy), (normwise, per_site, largest) in sorted(ERRORS.items()):
        print(f"AtP vs finite differences, {name:>14} {strategy:>9}: normwise {normwise:.1e} (eps {EPS:g}), per site {per_site:.1e} (Richardson, eps {EPS_SITE:g}); largest effect {largest:.1e}")


def coconut_traces(model) -> PairTraces:
    """Two Coconut questions of one length, a common answer prefix teacher-forced, scored at the two
    base-vocabulary tokens whose logit difference the corruption moves most (the random tiny models'
    effects are small; this keeps them well above float64 rounding)."""
    answer = torch.tensor(model.tokenizer(" Tom is", add_special_tokens=False)["input_ids"])
    clean, corrupted = (model.trace(q, answer=answer) for q in COCONUT_QUESTIONS)
    assert clean.layout == corrupted.layout
    vocab = min(model.bot_id, model.eot_id)  # the base vocabulary, not the markers
    moved = clean.next_logits[:vocab] - corrupted.next_logits[:vocab]
    pair = Pair("coconut", *COCONUT_QUESTIONS, "pet", "not", NumberChange("cat", "cow", (29, 32)))
    return PairTraces(pair, clean, corrupted, int(moved.argmax()), int(moved.argmin()))


@pytest.fixture(scope="module")
def codi(tiny_codi, one_thread):
    _, base, tok, paths = tiny_codi
    model = load_codi(paths["bin"], (base, tok), device="cpu", dtype=torch.float64)
    assert model.cfg.dtype == torch.float64 and next(model.prj.parameters()).dtype == torch.float64
    return "codi-llama", model, trace_pair(model, arithmetic_pairs(1, seed=3)[0])


@pytest.fixture(scope="module", params=["codi", "codi-gpt2", "coconut-gpt2", "coconut-llama"])
def case(request):
    if request.param == "codi":
        return request.getfixturevalue("codi")
    if request.param == "codi-gpt2":  # learned positions, LayerNorm, Conv1D LoRA, a prj without LayerNorm
        _, base, tok, paths = request.getfixturevalue("tiny_gpt2_codi")
        request.getfixturevalue("one_thread")
        model = load_codi(paths["bin"], (base, tok), device="cpu", dtype=torch.float64)
        pair = next(a.pair for a in align_to_model(arithmetic_pairs(40, seed=3), model))
        return "codi-gpt2", model, trace_pair(model, pair)
    c = request.getfixturevalue("tiny_gpt2_coconut" if request.param.endswith("gpt2") else "tiny_llama_coconut")
    request.getfixturevalue("one_thread")
    model = load_coconut(c.ckpt_dir, c.base_dir, num_latents=4, device="cpu", dtype=torch.float64)
    return request.param, model, coconut_traces(model)


# ----------------------------------------------------------------------------- helpers


def checked_positions(pt: PairTraces) -> list[int]:
    """Three question tokens, bot, every latent, eot, the answer position and the last (answer) token."""
    lay = pt.corrupted.layout
    picked = {0, lay.n_question // 2, lay.n_question - 1, lay.bot, *lay.latent_positions, lay.eot, lay.answer_position, lay.seq_len - 1}
    return sorted(picked)


def checked_sites(model, pt: PairTraces, strategy: str) -> list[Site]:
    """A hook of every family (per head for hook_z) at every checked position."""
    n = model.cfg.n_layers
    hooks = [
        ("blocks.0.hook_resid_pre", None),
        (f"blocks.{n - 1}.hook_resid_pre", None),
        ("blocks.1.hook_resid_mid", None),
        ("blocks.1.hook_resid_post", None),
        (f"blocks.{n - 1}.hook_attn_out", None),
        ("blocks.0.hook_mlp_out", None),
        ("blocks.1.attn.hook_z", 1),
        (f"blocks.{n - 1}.attn.hook_z", model.cfg.n_heads - 1),
        ("hook_thought", None),
    ]
    if model.prj is not None:
        hooks += [("prj.hook_in", None), ("prj.hook_hidden", None)]
    positions = checked_positions(pt)
    if strategy == "feedback":  # the engine patches feedback at latent positions only
        positions = [p for p in positions if p in pt.corrupted.latent_positions]
    return [Site(h, (p,), head) for h, head in hooks for p in positions]


def logit_diff_fn(pt: PairTraces):
    return lambda logits: logits[pt.clean_token] - logits[pt.corrupted_token]


def finite_differences(model, pt: PairTraces, sites, strategy: str, metric, steps=(EPS,)) -> list[float] | dict[float, list[float]]:
    """(metric(patch at +eps) - metric(patch at -eps)) / (2 eps) of the exact engine, per site (per step
    when several steps are given)."""
    ivs = {(h, s): as_intervention(lambda act, clean, e=s * h: act + e * (clean - act)) for h in steps for s in (1, -1)}
    jobs = [Job((site,), strategy, intervention=ivs[h, s]) for site in sites for h in steps for s in (1, -1)]
    res = iter(BatchPatcher(model, [(pt.corrupted, pt.clean)], decode=False, batch_size=64).run(jobs))  # fixed batches: the same rounding every run
    out: dict[float, list[float]] = {h: [] for h in steps}
    for _ in sites:
        for h in steps:
            plus, minus = next(res), next(res)
            out[h].append(float(metric(plus.next_logits) - metric(minus.next_logits)) / (2 * h))
    return out[steps[0]] if len(steps) == 1 else out


def lookup(df: pd.DataFrame, column: str = "estimate") -> dict[tuple, float]:
    return {(r.hook, r.position, None if pd.isna(r.head) else int(r.head)): float(getattr(r, column)) for r in df.itertuples(index=False)}


def normwise_error(est: list[float], fd: list[float]) -> float:
    """max |est - fd| / max |fd|."""
    return max(abs(e - f) for e, f in zip(est, fd)) / max(abs(f) for f in fd)


def max_relative_error(est: list[float], fd: list[float]) -> float:
    """max over sites of |est - fd| / max(|fd|, FLOOR * max |fd|, ABS_FLOOR)."""
    scale = max(FLOOR * max(abs(f) for f in fd), ABS_FLOOR)
    return max(abs(e - f) / max(abs(f), scale) for e, f in zip(est, fd))


def families(model) -> list[str]:
    return BLOCK_FAMILIES + ["thought"] + (["prj_in", "prj_hidden"] if model.prj is not None else [])


# ----------------------------------------------------------------------------- gradient paths vs finite differences


@pytest.mark.parametrize("strategy", ["parallel", "iterative", "feedback"])
def test_estimates_are_the_exact_engines_derivative(case, strategy):
    """Normwise (the largest error over the largest effect) at eps = 1e-4, and site by site (every site
    whose effect is at least 1% of the largest and 1e-6) by Richardson extrapolation from eps = 1e-3, 2e-3."""
    name, model, pt = case
    df = attribute(model, pt, families(model), strategy)
    est = lookup(df)
    names = pt.corrupted.layout.names
    sites = checked_sites(model, pt, strategy)
    fd = finite_differences(model, pt, sites, strategy, logit_diff_fn(pt), steps=(EPS, EPS_SITE, 2 * EPS_SITE))
    richardson = [(4 * a - b) / 3 for a, b in zip(fd[EPS_SITE], fd[2 * EPS_SITE])]
    atp = [est[(s.hook, names[s.positions[0]], s.head)] for s in sites]
    normwise, per_site = normwise_error(atp, fd[EPS]), max_relative_error(atp, richardson)
    ERRORS[(name, strategy)] = (normwise, per_site, max(abs(f) for f in fd[EPS]))
    assert normwise < REL and per_site < REL, (normwise, per_site)
    assert max(abs(f) for f in fd[EPS]) > 1e-5  # the sites matter: the check is not of zeros (FD noise is ~1e-11)
    if strategy != "feedback":  # sites at every kind of position were compared
        kinds = {"q", "bot", "latent", "eot", "prefix"} | ({"answer"} if pt.corrupted.layout.n_answer else set())  # GPT-2 writes " 18" as one token: no common answer prefix
        assert {names[s.positions[0]].split("[")[0] for s in sites} >= kinds


def test_where_a_path_does_not_exist_the_estimate_is_exactly_zero(codi):
    _, model, pt = codi
    lay = pt.corrupted.layout
    fed = {lay.name(p) for p in [lay.bot, *lay.latent_positions[:-1]]}
    fb = attribute(model, pt, ["resid_post", "thought"], "feedback")
    assert (fb.loc[~fb.position.isin(fed), "estimate"] == 0).all()
    assert (fb.loc[fb.position.isin(fed) & (fb.hook == "hook_thought"), "estimate"].abs() > 0).all()
    par = attribute(model, pt, ["thought", "prj_in"], "parallel")
    assert (par.estimate == 0).all()  # the fed thoughts are constants: the thought map carries nothing
    it = attribute(model, pt, ["resid_post"], "iterative")
    after = it.position.isin(lay.names[lay.latent_positions[-1] :])  # no thought fed after the last latent: iterative = parallel
    par = attribute(model, pt, ["resid_post"], "parallel")
    torch.testing.assert_close(torch.tensor(it.loc[after, "estimate"].to_numpy()), torch.tensor(par.loc[after, "estimate"].to_numpy()), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("metric", ["normalized_effect", "kl", "callable"])
def test_other_metrics_are_derivatives_too(codi, metric):
    _, model, pt = codi
    if metric == "normalized_effect":
        denom = pt.clean_logit_diff - pt.corrupted_logit_diff
        fn = lambda logits: (logits[pt.clean_token] - logits[pt.corrupted_token]) / denom  # noqa: E731  (the constant shift drops out)
        arg = metric
    elif metric == "kl":
        fn = lambda logits: kl_divergence(pt.clean.next_logits, logits)  # noqa: E731  (a float64 number)
        arg = metric
    else:
        fn = lambda logits: logits.log_softmax(-1)[pt.clean_token]  # noqa: E731
        arg = fn
    lay = pt.corrupted.layout
    sites = [Site("blocks.1.hook_resid_post", (p,)) for p in (lay.n_question - 1, lay.latent(0), lay.latent(3), lay.seq_len - 1)]
    sites.append(Site("blocks.2.attn.hook_z", (lay.latent(1),), 2))
    for strategy in ("parallel", "iterative"):
        est = lookup(attribute(model, pt, ["resid_post", "z"], strategy, metric=arg))
        fd = finite_differences(model, pt, sites, strategy, fn)
        atp = [est[(s.hook, lay.name(s.positions[0]), s.head)] for s in sites]
        assert normwise_error(atp, fd) < REL


# ----------------------------------------------------------------------------- the decomposition


def test_remainder_is_the_attention_then_thought_map_paths(case):
    """iterative = parallel + feedback + remainder, and the remainder equals a hand-built gradient
    along exactly those paths: for a site at p, the direction its patch moves each later thought
    when every fed thought is held (w_q = d thought_q / d eps, a parallel patch, finite differences
    of the made thoughts), times d metric / d thought_q along every path after it (the iterative
    engine adding eps * w_q at hook_thought, finite differences), summed over the thoughts fed after p."""
    name, model, pt = case
    lay = pt.corrupted.layout
    dec = decompose(model, pt, ["resid_post", "z"])
    torch.testing.assert_close(torch.tensor((dec.parallel + dec.feedback + dec.remainder).to_numpy()), torch.tensor(dec.iterative.to_numpy()), rtol=1e-12, atol=1e-15)
    rows = lookup(dec, "remainder")
    fed = [lay.bot, *lay.latent_positions[:-1]]
    plus = as_intervention(lambda act, clean: act + EPS * (clean - act))
    minus = as_intervention(lambda act, clean: act - EPS * (clean - act))
    sites = [Site("blocks.1.hook_resid_post", (lay.n_question - 1,)), Site("blocks.0.hook_resid_post", (lay.latent(1),)), Site("blocks.1.attn.hook_z", (lay.bot,), 0)]
    metric = logit_diff_fn(pt)
    for site in sites:
        p = site.positions[0]
        made = [patch_sites(model, pt.corrupted, pt.clean, [site], "parallel", intervention=iv, decode=False).cache["hook_thought"][0] for iv in (plus, minus)]
        w = (made[0] - made[1]) / (2 * EPS)  # [seq, d]: how the patch moves each thought made, fed thoughts held
        later = [q for q in fed if q > p]
        jobs = [Job((Site("hook_thought", (q,)),), "iterative", intervention=Add(w[q], s * EPS)) for q in later for s in (1, -1)]
        res = BatchPatcher(model, [(pt.corrupted, pt.clean)], decode=False).run(jobs)
        by_hand = sum(float(metric(res[2 * i].next_logits) - metric(res[2 * i + 1].next_logits)) / (2 * EPS) for i in range(len(later)))
        atp = rows[(site.hook, lay.name(p), site.head)]
        assert abs(by_hand) > 1e-9, (name, site)  # a case where the paths carry something
        # + 1e-10: the central difference's own rounding, about 1e-16 x |metric| / EPS (it failed once at 2.5e-12 over 1.9e-12)
        assert abs(atp - by_hand) <= REL * abs(by_hand) + 1e-10, (name, site, atp, by_hand)


# ----------------------------------------------------------------------------- the frame


def test_frame_shape_columns_and_position_names(codi):
    _, model, pt = codi
    lay = pt.corrupted.layout
    df = attribute(model, pt, ["resid_post", "z", "thought"], "iterative")
    n, heads, seq = model.cfg.n_layers, model.cfg.n_heads, lay.seq_len
    assert list(df.columns) == ["pair", "hook", "layer", "position", "head", "estimate"]
    assert len(df) == n * seq + n * heads * seq + seq
    resid = df[df.hook == "blocks.1.hook_resid_post"]
    assert resid.position.tolist() == lay.names and resid["head"].isna().all() and (resid.layer == 1).all()
    z = df[df.hook == "blocks.2.attn.hook_z"]
    assert z["head"].tolist() == list(range(heads)) * seq and z.position.tolist() == [p for p in lay.names for _ in range(heads)]
    thought = df[df.hook == "hook_thought"]
    assert thought.layer.isna().all() and thought["head"].isna().all()
    assert {"q[0]", "bot", "latent[0]", f"latent[{lay.num_latents - 1}]", "eot", "prefix[0]", "answer[0]"} <= set(df.position)
    assert (df.pair == 0).all() and df.attrs == {"strategy": "iterative", "metric": "logit_diff"}
    assert df.estimate.dtype == "float64" and df.estimate.notna().all()
    assert resolve_hooks(model, ["blocks.0.hook_resid_post", "resid_post", "attn.hook_z"])[:2] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_several_pairs_and_bad_arguments(codi):
    _, model, pt = codi
    other = trace_pair(model, arithmetic_pairs(2, seed=8)[1])
    both = attribute(model, [pt, other], ["mlp_out"], "parallel")
    one = attribute(model, other, ["mlp_out"], "parallel")
    assert sorted(both.pair.unique()) == [0, 1]
    torch.testing.assert_close(torch.tensor(both[both.pair == 1].estimate.to_numpy()), torch.tensor(one.estimate.to_numpy()), rtol=1e-12, atol=0)
    with pytest.raises(PatchError, match="unknown strategy"):
        attribute(model, pt, ["mlp_out"], "sideways")
    with pytest.raises(PatchError, match="unknown hook or family"):
        attribute(model, pt, ["nonsense"], "parallel")
    with pytest.raises(PatchError, match="not indexed by position"):
        attribute(model, pt, ["blocks.0.attn.hook_pattern"], "parallel")
    with pytest.raises(PatchError, match="unknown metric"):
        attribute(model, pt, ["mlp_out"], "parallel", metric="accuracy")
    with pytest.raises(PatchError, match="PairTraces"):
        attribute(model, pt.corrupted, ["mlp_out"], "parallel")


def test_leaves_no_gradient_state_behind(codi):
    _, model, pt = codi
    params = list(model.model.parameters()) + list(model.prj.parameters())
    flags = [p.requires_grad for p in params]
    with torch.no_grad():
        df = attribute(model, pt, ["resid_post"], "feedback", grad_drop=True)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert [p.requires_grad for p in params] == flags and all(p.grad is None for p in params)
    assert not any(h.fwd_hooks for h in model.model.hook_dict.values())  # every hook removed
    assert df.estimate.notna().all()


# ----------------------------------------------------------------------------- AtP* options


def test_grad_drop_is_the_mean_magnitude_with_each_layer_cut(codi):
    """Parallel GradDrop vs a hand-built gradient: the layer's attn_out and mlp_out detached in a plain pass."""
    _, model, pt = codi
    df = attribute(model, pt, ["resid_pre", "mlp_out"], "parallel", grad_drop=True)
    assert list(df.columns)[-2:] == ["estimate", "grad_drop"]
    clean = pt.clean.cache
    n = model.cfg.n_layers
    for hook in ("blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"):
        total = torch.zeros(pt.corrupted.seq_len, dtype=torch.float64)
        for layer in range(n):
            delta = torch.zeros_like(pt.corrupted.cache[hook][0:1], requires_grad=True)
            cut = [(f"blocks.{layer}.{h}", lambda act, hook: act.detach()) for h in ("hook_attn_out", "hook_mlp_out")]
            with torch.enable_grad():
                out = model.forward(pt.corrupted.input_embeds[None], fwd_hooks=[(hook, lambda act, hook, delta=delta: act + delta), *cut], logit_positions=[pt.corrupted.seq_len - 1])
                (grad,) = torch.autograd.grad(logit_diff_fn(pt)(out.logits[0, -1]), delta, allow_unused=True)
            if grad is not None:
                total += ((clean[hook][0] - pt.corrupted.cache[hook][0]) * grad[0]).sum(-1).abs()
        got = torch.tensor(df[df.hook == hook].grad_drop.to_numpy())
        torch.testing.assert_close(got, total / (n - 1), rtol=1e-9, atol=1e-14)


def pattern_derivative(model, pt: PairTraces, layer: int, change, strategy: str) -> float:
    """d metric / d eps with eps * change [heads, seq, seq] added to layer's attention pattern in
    every pass (parallel: one pass, fed thoughts held; iterative: the real loop, `run_with_hooks`).
    The step moves the pattern by at most 1e-4 (the change itself may be far smaller)."""
    name = f"blocks.{layer}.attn.hook_pattern"
    step = 1e-4 / float(change.abs().max())
    values = []
    for eps in (step, -step):

        def add(act, hook, eps=eps):
            rows = torch.arange(act.shape[3] - act.shape[2], act.shape[3])  # no padding: the chunk's queries are the last key columns
            return act + eps * change[:, rows][:, :, : act.shape[3]][None]

        with torch.no_grad():
            if strategy == "parallel":
                logits = model.forward(pt.corrupted.input_embeds[None], fwd_hooks=[(name, add)]).logits[0, -1]
            else:
                logits = model.run_with_hooks(pt.corrupted.question, [(name, add)], answer=pt.corrupted.answer_ids)[0, -1]
        values.append(float(logit_diff_fn(pt)(logits)))
    return (values[0] - values[1]) / (2 * step)


@pytest.mark.parametrize("strategy", ["parallel", "iterative"])
def test_qk_fix_is_exact_up_to_the_pattern(case, strategy):
    """The QK-fixed estimate of a q or k site is the metric's derivative along the exact change of
    the attention pattern that the site's clean patch makes (everything after the pattern linear)."""
    name, model, pt = case
    lay = pt.corrupted.layout
    layer = 1
    df = attribute(model, pt, ["q", "k", "resid_post"], strategy, qk_fix=True)
    assert df.loc[df.hook.str.endswith("resid_post"), "qk_fix"].isna().all()
    fixed = lookup(df, "qk_fix")
    cache = pt.corrupted.cache
    pattern = f"blocks.{layer}.attn.hook_pattern"
    picked = []
    for family in ("hook_q", "hook_k"):  # per family, the site whose pattern change matters most, and the largest at a latent
        rows = df[df.hook == f"blocks.{layer}.attn.{family}"]
        latent = rows[rows.position.str.startswith("latent")]
        for r in (rows.loc[rows.qk_fix.abs().idxmax()], latent.loc[latent.qk_fix.abs().idxmax()]):
            picked.append((r.hook, lay.position(r.position), int(r["head"])))
    for name_, p, head in picked:
        source = pt.clean.cache[name_][0, p, head]

        def write(act, hook, p=p, head=head, source=source):
            act = act.clone()
            act[0, p, head] = source
            return act

        with torch.no_grad():
            patched = model.forward(pt.corrupted.input_embeds[None], fwd_hooks=[(name_, write)], with_cache=True, names_filter=[pattern]).cache[pattern][0]
        change = patched - cache[pattern][0]  # the exact change of this layer's pattern, nothing else moved yet
        expected = pattern_derivative(model, pt, layer, change, strategy)
        got = fixed[(name_, lay.name(p), head)]
        assert abs(got - expected) <= REL * abs(expected), (name, name_, got, expected)
        assert abs(expected) > 1e-12


# ----------------------------------------------------------------------------- verification against exact patches


def test_verify_top_k_runs_exact_patches_of_the_top_sites(codi):
    _, model, pt = codi
    df = attribute(model, pt, ["resid_post", "z"], "iterative")
    v = verify_top_k(model, pt, df, k=12, extra=8)
    assert len(v.table) == 20 and {"estimate", "exact"} <= set(v.table.columns)
    top = v.table.iloc[0]
    site = Site(top.hook, (pt.corrupted.layout.position(top.position),), None if pd.isna(top["head"]) else int(top["head"]))
    exact = patch_sites(model, pt.corrupted, pt.clean, [site], "iterative", decode=False, with_cache=False).next_logits
    assert math.isclose(top.exact, float(logit_diff_fn(pt)(exact) - logit_diff_fn(pt)(pt.corrupted.next_logits)), rel_tol=1e-9, abs_tol=1e-12)
    assert v.spearman > 0.5 and 0 <= v.recall <= 1 and v.recall_k == 10
    fb = attribute(model, pt, ["resid_post"], "feedback")
    vf = verify_top_k(model, pt, fb, k=30)
    latent = vf.table.position.str.startswith("latent")
    assert "bot" in set(vf.table.position) and vf.table.loc[~latent, "exact"].isna().all() and vf.table.loc[latent, "exact"].notna().all()


def test_no_latents_every_strategy_is_parallel(codi):
    """With 0 thoughts nothing is fed: iterative equals parallel, feedback is 0 everywhere."""
    _, model, pt = codi
    none = model.with_latents(0)
    pt0 = trace_pair(none, pt.pair)
    est = {s: attribute(none, pt0, ["resid_post", "z"], s).estimate.to_numpy() for s in ("parallel", "iterative", "feedback")}
    torch.testing.assert_close(torch.tensor(est["iterative"]), torch.tensor(est["parallel"]), rtol=1e-9, atol=1e-13)
    assert (est["feedback"] == 0).all() and abs(est["parallel"]).max() > 1e-4
