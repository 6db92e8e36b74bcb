"""The aggregation rule against references written here in plain torch (loops over updates and
elements; torch.optim.SGD for DiLoCo's Nesterov step), never the aggregator's own helpers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stamen.core.errors import UserError
from stamen.core.model import GPT, PRESETS, weights
from stamen.core.plan import Plan, full_plan
from stamen.core.records import Update
from stamen.server.aggregator import Aggregator, AggregatorConfig, BadUpdate, StaleUpdate
from stamen.server.outer import OuterConfig
from stamen.server.robust import DefenceConfig

CFG = PRESETS["gpt-tiny"]
TOL = dict(rtol=0, atol=1e-6)


def init_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {n: t.clone() for n, t in weights(GPT(CFG)).items()}


def make_update(task_id: str, base: int, plan: Plan, tokens: int, seed: int, scale: float = 0.01) -> Update:
    gen = torch.Generator().manual_seed(seed)
    shapes = plan.shapes(CFG)
    delta = {n: torch.randn(shapes[n], generator=gen) * scale for n in plan.trainable(CFG)}
    return Update(task_id, base, plan, delta, tokens)


def embed(name: str, sub: torch.Tensor, full_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference placement of a width-cut slice into its global tensor, written from the model's
    layout (c_attn rows are q|k|v thirds, each cut to a prefix; other cuts are prefixes)."""
    out = torch.zeros(full_shape)
    hit = torch.zeros(full_shape)
    if name.endswith(("c_attn.weight", "c_attn.bias")):
        third, kept = full_shape[0] // 3, sub.shape[0] // 3
        for i in range(3):
            out[i * third:i * third + kept] = sub[i * kept:(i + 1) * kept]
            hit[i * third:i * third + kept] = 1
        return out, hit
    region = tuple(slice(0, s) for s in sub.shape)
    out[region] = sub
    hit[region] = 1
    return out, hit


def reference_mean(updates: list[Update], weights_of: list[float]) -> tuple[dict, dict]:
    """g_j = Σ w_i Δ_i[j] / Σ w_i over updates covering j, elementwise, and the coverage."""
    full = init_weights()
    S = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in full.items()}
    W = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in full.items()}
    for u, w in zip(updates, weights_of):
        for n, d in u.delta.items():
            val, hit = embed(n, d, tuple(full[n].shape))
            S[n] += w * val.double()
            W[n] += w * hit.double()
    g = {n: torch.where(W[n] > 0, S[n] / W[n].clamp_min(1e-300), 0.0).float() for n in full}
    return g, {n: W[n] > 0 for n in full}


def test_full_plans_sync_is_exactly_fedavg():
    w0 = init_weights()
    plan = full_plan(CFG)
    agg = Aggregator(CFG, w0, AggregatorConfig(buffer_k=3, tau_max=0, outer=OuterConfig("fedavg", lr=1.0)))
    theta = {n: t.clone() for n, t in w0.items()}
    for rnd in range(2):
        tokens = [100, 300, 600]
        locals_ = []
        reports = []
        for i, tok in enumerate(tokens):
            u = make_update(f"r{rnd}c{i}", rnd, plan, tok, seed=10 * rnd + i)
            locals_.append({n: theta[n] - u.delta[n] for n in theta})  # θ_local = θ_base − Δ
            reports.append(agg.submit(u, now=0.0))
        assert reports[:2] == [None, None] and reports[2].version == rnd + 1
        # FedAvg: the token-weighted mean of the client models
        theta = {n: sum(t * l[n] for t, l in zip(tokens, locals_)) / sum(tokens) for n in theta}
        for n in theta:
            torch.testing.assert_close(agg.weights[n], theta[n], **TOL)
        assert reports[2].coverage == 1.0 and reports[2].updates == 3 and reports[2].tokens == 1000


def test_full_plans_sync_is_exactly_diloco_nesterov():
    w0 = init_weights()
    plan = full_plan(CFG)
    agg = Aggregator(CFG, w0, AggregatorConfig(buffer_k=2, tau_max=0))  # defaults: nesterov 0.7 / 0.9
    params = {n: torch.nn.Parameter(t.clone()) for n, t in w0.items()}
    opt = torch.optim.SGD(params.values(), lr=0.7, momentum=0.9, nesterov=True)
    for rnd in range(3):
        ups = [make_update(f"{rnd}-{i}", rnd, plan, 64 * (i + 1), seed=100 * rnd + i) for i in range(2)]
        for u in ups:
            agg.submit(u, now=float(rnd))
        for n, p in params.items():
            p.grad = sum(u.tokens * u.delta[n] for u in ups) / sum(u.tokens for u in ups)
        opt.step()
        for n, p in params.items():
            torch.testing.assert_close(agg.weights[n], p.detach(), **TOL)


def test_disjoint_block_plans_change_each_block_by_its_own_trainers():
    w0 = init_weights()
    low, high = Plan("low", (0, 1), 1.0, ("blocks.*",)), Plan("high", (2, 3), 1.0, ("blocks.*",))
    agg = Aggregator(CFG, w0, AggregatorConfig(buffer_k=4, tau_max=0, outer=OuterConfig("fedavg", lr=1.0)))
    ups = [make_update("a", 0, low, 10, 1), make_update("b", 0, low, 30, 2),
           make_update("c", 0, high, 20, 3), make_update("d", 0, high, 20, 4)]
    for u in ups:
        agg.submit(u, now=0.0)
    for n, t in w0.items():
        owners = [u for u in ups if n in u.delta]
        if not owners:
            assert torch.equal(agg.weights[n], t), n  # embeddings, ln_f: nobody trained them
            continue
        assert {u.plan.name for u in owners} == {"low" if n.split(".")[1] in "01" else "high"}
        mean = sum(u.tokens * u.delta[n] for u in owners) / sum(u.tokens for u in owners)
        torch.testing.assert_close(agg.weights[n], t - mean, **TOL)


@pytest.mark.parametrize("outer", ["fedavg", "nesterov", "fedadam"])
def test_nested_width_plans_average_per_element(outer):
    w0 = init_weights()
    plans = [Plan("w25", (0, 1, 2, 3), 0.25, ("blocks.*",)), Plan("w50", (0, 1, 2, 3), 0.5, ("blocks.*",)),
             Plan("w100", (0, 1, 2, 3), 1.0, ("blocks.*", "ln_f.*"))]
    oc = OuterConfig(outer, lr=0.5, momentum=0.8, betas=(0.9, 0.99), eps=1e-3)
    agg = Aggregator(CFG, w0, AggregatorConfig(buffer_k=3, tau_max=0, outer=oc))
    theta = {n: t.clone() for n, t in w0.items()}
    m = {n: torch.zeros_like(t) for n, t in w0.items()}
    v = {n: torch.zeros_like(t) for n, t in w0.items()}
    # Round 1 covers everything in the blocks; round 2 only the narrow prefixes, so the momentum
    # that round 1 left in the wide elements must stay frozen there.
    rounds = [[(plans[0], 5), (plans[1], 7), (plans[2], 11)], [(plans[0], 3), (plans[0], 9), (plans[1], 4)]]
    for rnd, members in enumerate(rounds):
        ups = [make_update(f"{rnd}-{i}", rnd, p, tok, seed=50 * rnd + i) for i, (p, tok) in enumerate(members)]
        prev = {n: t.clone() for n, t in agg.weights.items()}
        for u in ups:
            agg.submit(u, now=0.0)
        g, cov = reference_mean(ups, [float(u.tokens) for u in ups])
        for n in theta:
            c = cov[n]
            if outer == "fedavg":
                step = oc.lr * g[n]
            elif outer == "nesterov":
                m_new = oc.momentum * m[n] + g[n]
                step = oc.lr * (g[n] + oc.momentum * m_new)
                m[n] = torch.where(c, m_new, m[n])
            else:
                m_new = 0.9 * m[n] + 0.1 * g[n]
                v_new = 0.99 * v[n] + 0.01 * g[n] ** 2
                step = oc.lr * m_new / (v_new.sqrt() + 1e-3)
                m[n], v[n] = torch.where(c, m_new, m[n]), torch.where(c, v_new, v[n])
            theta[n] = torch.where(c, theta[n] - step, theta[n])
            torch.testing.assert_close(agg.weights[n], theta[n], **TOL)
            assert torch.equal(agg.weights[n][~c], prev[n][~c]), n  # uncovered: untouched
    assert torch.equal(agg.weights["wte.weight"], w0["wte.weight"])


def test_staleness_weights_and_rejection():
    w0 = init_weights()
    plan = full_plan(CFG)
    cfg = AggregatorConfig(buffer_k=3, tau_max=2, token_exponent=0.5, staleness_exponent=1.0,
                           max_wait_s=1.0, outer=OuterConfig("fedavg", lr=1.0))
    agg = Aggregator(CFG, w0, cfg)
    for i in range(3):  # versions 0 → 3, one max-wait flush each
        agg.submit(make_update(f"warm{i}", i, plan, 100, seed=i), now=float(i))
        assert agg.poll(now=i + 1.0).version == i + 1
    before = {n: t.clone() for n, t in agg.weights.items()}
    ups = [make_update("s0", 3, plan, 400, 7), make_update("s1", 2, plan, 100, 8), make_update("s2", 1, plan, 900, 9)]
    with pytest.raises(StaleUpdate, match="3 versions stale; the limit is 2"):
        agg.submit(make_update("old", 0, plan, 100, 6), now=0.0)
    assert "old" not in agg.seen and agg.buffer.count == 0
    for u in ups:
        agg.submit(u, now=0.0)
    # w = tokens^0.5 / (1 + τ)
    ws = [400 ** 0.5 / 1, 100 ** 0.5 / 2, 900 ** 0.5 / 3]
    for n in before:
        mean = sum(w * u.delta[n] for w, u in zip(ws, ups)) / sum(ws)
        torch.testing.assert_close(agg.weights[n], before[n] - mean, **TOL)


def test_default_staleness_weight_is_fedbuff():
    w0 = init_weights()
    plan = Plan("ln", (0,), 1.0, ("ln_f.*",))
    agg = Aggregator(CFG, w0, AggregatorConfig(buffer_k=1, tau_max=3, outer=OuterConfig("fedavg", lr=1.0)))
    agg.submit(make_update("v1", 0, plan, 1, 0), now=0.0)
    assert agg.check(make_update("x", 0, plan, 50, 1)).weight == pytest.approx(50 / 2 ** 0.5, rel=1e-12)


def test_flush_triggers_tokens_and_wait_with_quorum():
    w0 = init_weights()
    plan = full_plan(CFG)
    agg = Aggregator(CFG, w0, AggregatorConfig(buffer_k=10, tau_max=5, max_tokens=500, max_wait_s=30.0, min_quorum=2))
    assert agg.submit(make_update("a", 0, plan, 300, 1), now=0.0) is None
    rep = agg.submit(make_update("b", 0, plan, 200, 2), now=1.0)
    assert rep.reason == "tokens" and rep.version == 1 and rep.tokens == 500
    agg.submit(make_update("c", 1, plan, 10, 3), now=100.0)
    assert agg.poll(now=200.0) is None  # one update is below the quorum of two
    agg.submit(make_update("d", 0, plan, 10, 4), now=120.0)
    assert agg.poll(now=129.0) is None  # 29 s since the buffer opened at 100
    rep = agg.poll(now=130.0)
    assert rep.reason == "wait" and rep.updates == 2 and rep.mean_staleness == 0.5 and agg.version == 2


def test_versions_kept_within_tau_max():
    w0 = init_weights()
    plan = Plan("ln", (0,), 1.0, ("ln_f.*",))
    agg = Aggregator(CFG, w0, AggregatorConfig(buffer_k=1, tau_max=2, outer=OuterConfig("fedavg", lr=1.0)))
    snaps = {0: {n: t.clone() for n, t in agg.weights.items()}}
    for v in range(1, 5):
        agg.submit(make_update(f"u{v}", v - 1, plan, 10, v), now=0.0)
        snaps[v] = {n: t.clone() for n, t in agg.weights.items()}
    assert sorted(agg.history) == [2, 3, 4]
    for v in (2, 3, 4):
        assert all(torch.equal(agg.weights_at(v)[n], snaps[v][n]) for n in w0)
    assert agg.weights_at(2)["wte.weight"] is agg.weights["wte.weight"]  # unchanged tensors are shared
    with pytest.raises(BadUpdate, match="not kept"):
        agg.weights_at(1)


@pytest.mark.parametrize("mutate,match", [
    (lambda u: u.delta.pop("ln_f.bias"), "do not match"),
    (lambda u: u.delta.__setitem__("ln_f.bias", torch.zeros(3)), "shape"),
    (lambda u: setattr(u, "tokens", 0), "tokens"),
    (lambda u: setattr(u, "base_version", 5), "newer"),
])
def test_bad_updates_are_rejected_with_a_reason_and_change_nothing(mutate, match):
    w0 = init_weights()
    agg = Aggregator(CFG, w0, AggregatorConfig(buffer_k=2, tau_max=1))
    u = make_update("bad", 0, Plan("ln", (0,), 1.0, ("ln_f.*",)), 10, 1)
    mutate(u)
    with pytest.raises(BadUpdate, match=match):
        agg.submit(u, now=0.0)
    assert agg.buffer.count == 0 and not agg.seen
    assert all(not s.any() for s in agg.S.values())
    assert issubclass(BadUpdate, UserError) and issubclass(StaleUpdate, UserError)


PLANS = [full_plan(CFG), Plan("w25", (0, 1), 0.25, ("blocks.*",)), Plan("w50", (1, 2, 3), 0.5),
         Plan("top", (3,), 1.0, ("blocks.3.mlp.*", "ln_f.*"))]


def run(order: list[int], specs: list[tuple[int, int, int]], resend: list[int] = ()) -> Aggregator:
    agg = Aggregator(CFG, init_weights(), AggregatorConfig(buffer_k=len(specs), tau_max=0))
    for i in order:
        p, tok, seed = specs[i]
        agg.submit(make_update(f"t{i}", 0, PLANS[p], tok, seed), now=0.0)
    return agg


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 1000), st.integers(0, 10**6)), min_size=2, max_size=5),
       st.randoms(use_true_random=False))
def test_arrival_order_inside_a_flush_does_not_matter(specs, rnd):
    order = list(range(len(specs)))
    a = run(order, specs)
    rnd.shuffle(order)
    b = run(order, specs)
    assert a.version == b.version == 1
    for n in a.weights:
        torch.testing.assert_close(a.weights[n], b.weights[n], **TOL)  # equal up to fp32 summation order


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 1000), st.integers(0, 10**6)), min_size=3, max_size=5),
       st.integers(0, 2), st.integers(0, 10**6))
def test_resent_task_id_changes_nothing(specs, which, other_seed):
    agg = Aggregator(CFG, init_weights(), AggregatorConfig(buffer_k=len(specs), tau_max=0))
    twin = Aggregator(CFG, init_weights(), AggregatorConfig(buffer_k=len(specs), tau_max=0))
    for i, (p, tok, seed) in enumerate(specs):
        for target in (agg, twin):
            target.submit(make_update(f"t{i}", 0, PLANS[p], tok, seed), now=0.0)
        if i == which:  # a re-send (even with other contents) before the flush...
            assert agg.submit(make_update(f"t{i}", 0, PLANS[p], tok, other_seed), now=0.0) is None
    # ...and after the flush (it would be stale now: a duplicate is recognised before that)
    p, tok, _ = specs[which]
    assert agg.submit(make_update(f"t{which}", 0, PLANS[p], tok, other_seed), now=0.0) is None
    assert agg.version == twin.version == 1
    for n in agg.weights:
        assert torch.equal(agg.weights[n], twin.weights[n])
    for k in agg.opt_state:
        assert torch.equal(agg.opt_state[k], twin.opt_state[k])


def reference_add(updates: list[Update], weights_of: list[float]) -> tuple[dict, dict]:
    """combine = "add", elementwise: each plan's updates sum to S_p = Σ w_i Δ_i (w_i with its
    staleness discount), and T_p = Σ tokens_i over the elements the plan covers;
    g_j = Σ_p S_p[j] / max_p T_p over the plans covering j."""
    full = init_weights()
    S = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in full.items()}
    N = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in full.items()}
    for plan in {u.plan for u in updates}:
        mine = [(u, w) for u, w in zip(updates, weights_of) if u.plan == plan]
        T_p = float(sum(u.tokens for u, _ in mine))
        for u, w in mine:
            for n, d in u.delta.items():
                val, hit = embed(n, d, tuple(full[n].shape))
                S[n] += w * val.double()
                N[n] = torch.maximum(N[n], T_p * hit.double())
    g = {n: torch.where(N[n] > 0, S[n] / N[n].clamp_min(1e-300), 0.0).float() for n in full}
    return g, {n: N[n] > 0 for n in full}


@pytest.mark.parametrize("outer", ["fedavg", "nesterov"])
def test_add_sums_plans_each_relative_to_the_heaviest(outer):
    w0 = init_weights()
    gpu = full_plan(CFG)
    narrow, half = Plan("w25", (0,), 0.25, ("*",)), Plan("w50", (0, 1), 0.5, ("blocks.*",))
    oc = OuterConfig(outer, lr=0.7, momentum=0.9)
    agg = Aggregator(CFG, w0, AggregatorConfig(buffer_k=7, tau_max=2, combine="add", outer=oc, defence=DefenceConfig(rule="mean")))
    theta = {n: t.clone() for n, t in w0.items()}
    m = {n: torch.zeros_like(t) for n, t in w0.items()}
    # Version 0 -> 1 mixes three plans; 1 -> 2 has no GPU update: the narrow devices' plan is
    # then the heaviest wherever it reaches, and the stale update weighs 1/sqrt(2).
    rounds = [[(gpu, 0, 80), (gpu, 0, 60), (narrow, 0, 16), (narrow, 0, 16), (half, 0, 16), (half, 0, 32), (narrow, 0, 8)],
              [(narrow, 1, 16), (narrow, 0, 16), (half, 1, 16), (half, 1, 16), (narrow, 1, 8), (half, 0, 16), (narrow, 1, 4)]]
    for rnd, members in enumerate(rounds):
        ups = [make_update(f"{rnd}-{i}", base, p, tok, seed=70 * rnd + i) for i, (p, base, tok) in enumerate(members)]
        for u in ups:
            agg.submit(u, now=0.0)
        g, cov = reference_add(ups, [u.tokens * (1 + rnd - u.base_version) ** -0.5 for u in ups])
        for n in theta:
            c = cov[n]
            if outer == "fedavg":
                step = oc.lr * g[n]
            else:
                m_new = oc.momentum * m[n] + g[n]
                step = oc.lr * (g[n] + oc.momentum * m_new)
                m[n] = torch.where(c, m_new, m[n])
            theta[n] = torch.where(c, theta[n] - step, theta[n])
            torch.testing.assert_close(agg.weights[n], theta[n], **TOL)
    assert agg.version == 2


def test_add_with_one_plan_is_exactly_the_mean():
    """Like updates are averaged: with one plan and nothing stale (synchronous FedAvg/DiLoCo)
    "add" and "mean" publish bit-identical versions. (With staleness "add" keeps FedBuff's
    absolute discount, Σ s(τ_i) Δ_i over the undiscounted total, where "mean" renormalizes.)"""
    w0 = init_weights()
    plan = full_plan(CFG)
    aggs = [Aggregator(CFG, w0, AggregatorConfig(buffer_k=3, tau_max=0, combine=c, defence=DefenceConfig(rule="mean"))) for c in ("mean", "add")]
    for rnd in range(3):
        for i in range(3):
            u = make_update(f"{rnd}-{i}", rnd, plan, 64 * (i + 1), seed=10 * rnd + i)
            for a in aggs:
                a.submit(u, now=0.0)
    for n in w0:
        assert torch.equal(aggs[0].weights[n], aggs[1].weights[n]), n


def resumed_equals_straight(cfg: AggregatorConfig, ups: list[Update]) -> Aggregator:
    """Submit ``ups`` straight, and again with a checkpoint and restore before the last one:
    the versions must be bitwise equal. Returns the resumed aggregator."""
    w0 = init_weights()
    straight = Aggregator(CFG, w0, cfg)
    for u in ups:
        straight.submit(u, now=0.0)
    first = Aggregator(CFG, w0, cfg)
    for u in ups[:-1]:
        first.submit(u, now=0.0)
    tensors, meta = first.state()
    resumed = Aggregator.from_state(CFG, cfg, tensors, meta, set(first.seen))
    resumed.submit(ups[-1], now=0.0)
    assert resumed.version == straight.version == 1
    for n in w0:
        assert torch.equal(resumed.weights[n], straight.weights[n]), n
    return resumed


def test_add_survives_a_checkpoint_mid_buffer():
    plans = [full_plan(CFG), Plan("w25", (0,), 0.25, ("*",))]
    cfg = AggregatorConfig(buffer_k=4, tau_max=1, combine="add", defence=DefenceConfig(rule="mean"))
    resumed_equals_straight(cfg, [make_update(f"u{i}", 0, plans[i % 2], 16 * (i + 1), seed=i) for i in range(4)])


def test_add_refuses_a_robust_rule():
    with pytest.raises(UserError, match="mean defence rule"):
        AggregatorConfig(combine="add", defence=DefenceConfig(rule="median"))
    with pytest.raises(UserError, match="unknown combine"):
        AggregatorConfig(combine="sum")


def test_paced_by_counts_only_the_named_tiers_and_merges_every_update():
    """``paced_by``: K counts the nodes' updates only; the devices' that arrived meanwhile join
    the same flush, merged by the usual weighted mean (reference written here)."""
    w0 = init_weights()
    node, phone = Plan("gpu", full_plan(CFG).blocks), Plan("phone", (0,), 0.25, ("blocks.*", "ln_f.*"))
    agg = Aggregator(CFG, w0, AggregatorConfig(buffer_k=2, tau_max=2, paced_by=("gpu",),
                                               outer=OuterConfig("fedavg", lr=1.0)))
    order = [phone, node, phone, phone, node]
    ups = [make_update(f"u{i}", 0, p, 16 * (i + 1), seed=i) for i, p in enumerate(order)]
    reports = [agg.submit(u, now=0.0) for u in ups]
    assert reports[:4] == [None] * 4
    assert (reports[4].version, reports[4].updates, reports[4].reason) == (1, 5, "k")
    g, covered = reference_mean(ups, [float(u.tokens) for u in ups])
    for n in w0:
        torch.testing.assert_close(agg.weights[n], w0[n] - g[n], **TOL)
    # Devices alone never reach K: only time (max_wait_s) would publish them.
    assert all(agg.submit(make_update(f"p{i}", 1, phone, 16, seed=50 + i), now=1.0) is None for i in range(10))
    assert agg.version == 1 and agg.buffer.count == 10


def test_without_a_paced_client_every_update_counts():
    """With no client of a paced tier in the federation (``pace(False)``, which the coordinator
    says while none is registered), K counts every update: the versions are, bit for bit, those
    of the same aggregator with ``paced_by`` empty (the reference), not the max-wait ones."""
    w0 = init_weights()
    phone = Plan("phone", (0,), 0.25, ("blocks.*", "ln_f.*"))
    ups = [make_update(f"p{i}", i // 2, phone, 16 * (i + 1), seed=i) for i in range(6)]
    paced = Aggregator(CFG, w0, AggregatorConfig(buffer_k=2, tau_max=2, paced_by=("gpu",)))
    reference = Aggregator(CFG, w0, AggregatorConfig(buffer_k=2, tau_max=2))
    paced.pace(False)
    for u in ups:
        assert (paced.submit(u, now=0.0) is None) == (reference.submit(u, now=0.0) is None)
    assert paced.version == reference.version == 3
    assert all(torch.equal(paced.weights[n], reference.weights[n]) for n in w0)
    paced.pace(True)  # a node joined: the devices' updates stop counting
    assert all(paced.submit(make_update(f"q{i}", 3, phone, 16, seed=9 + i), now=0.0) is None for i in range(4))
    tensors, meta = paced.state()
    assert Aggregator.from_state(CFG, paced.config, tensors, meta, set(paced.seen)).pacing


def test_paced_buffer_survives_a_checkpoint():
    node, phone = Plan("gpu", full_plan(CFG).blocks), Plan("phone", (0,), 0.5, ("blocks.*", "ln_f.*"))
    cfg = AggregatorConfig(buffer_k=2, tau_max=1, paced_by=("gpu",))
    ups = [make_update(f"u{i}", 0, p, 32, seed=i) for i, p in enumerate([node, phone, phone, node])]
    assert resumed_equals_straight(cfg, ups).buffer.count == 0  # one version of all four (K counts the nodes)
