"""Defences in the aggregator against hand-computed toy vectors (as Flower's strategy tests
do): every update is constant, so each element's statistic is arithmetic on a few numbers
written out below. The norm bound, the finite guard, and the robust rules keep the per-element
coverage rule exact: an element's statistic sees only the updates that covered it."""

import math
import statistics
import warnings

import numpy as np
import pytest
import torch

from stamen.core.model import GPT, PRESETS, weights
from stamen.core.plan import Plan
from stamen.core.records import Update
from stamen.server.aggregator import Aggregator, AggregatorConfig, BadUpdate
from stamen.server.outer import OuterConfig
from stamen.server.robust import DefenceConfig, coordinatewise
from stamen.server.robust_matrix import filter_blocks

CFG = PRESETS["gpt-tiny"]
LN = Plan("ln", (0,), 1.0, ("ln_f.bias",))  # one vector of n_embd elements, sliced by no plan
MLP = "blocks.0.mlp.c_fc.weight"  # rows are hidden units: width plans keep a prefix of them
FULL_MLP, HALF_MLP = Plan("full", (0,), 1.0, (MLP,)), Plan("half", (0,), 0.5, (MLP,))


def w0():
    torch.manual_seed(0)
    return {n: t.clone() for n, t in weights(GPT(CFG)).items()}


def const(task, plan, value, tokens=100, base=0):
    return Update(task, base, plan, {n: torch.full(s, float(value)) for n, s in plan.shapes(CFG).items()
                                     if n in plan.trainable(CFG)}, tokens)


def agg(k=1, lr=1.0, **defence):
    """FedAvg with lr 1, so a flush moves θ by exactly the aggregate g."""
    return Aggregator(CFG, w0(), AggregatorConfig(buffer_k=k, tau_max=8, outer=OuterConfig("fedavg", lr=lr),
                                                  defence=DefenceConfig(**defence)))


def moved(a, name="ln_f.bias"):
    return w0()[name] - a.weights[name]


@pytest.mark.parametrize("rule, values, expect", [
    ("trimmed", [1, 2, 3, 4, 100], 3.0),  # trim 0.2 of 5 drops one each end: (2 + 3 + 4) / 3
    ("trimmed", [1, 2, 100], 103 / 3),  # ⌊0.2 · 3⌋ = 0: nothing is trimmed from three
    ("median", [1, 2, 3, 4, 100], 3.0),
    ("median", [1, 2, 3, 100], 2.5),  # even count: the mean of the two middle values, as numpy's
    ("mean", [1, 2, 3, 4, 100], 22.0),  # equal tokens: the plain mean
])
def test_rules_on_one_vector(rule, values, expect):
    a = agg(k=len(values), rule=rule, trim=0.2, norm_bound="off")
    for i, v in enumerate(values):
        a.submit(const(f"t{i}", LN, v), now=0.0)
    assert a.version == 1
    torch.testing.assert_close(moved(a), torch.full((CFG.n_embd,), expect), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule, first_half, second_half", [
    ("median", 10.0, 1.5),  # first half: {1, 2, 10, 20, 30}; second: only the full plans' {1, 2}
    ("trimmed", 32 / 3, 1.5),  # first: drop 1 and 30 → (2 + 10 + 20) / 3; second: ⌊0.4⌋ = 0 cut
])
def test_rules_see_only_the_updates_that_covered_each_element(rule, first_half, second_half):
    a = agg(k=5, rule=rule, trim=0.2, norm_bound="off")
    for i, (plan, v) in enumerate([(FULL_MLP, 1), (FULL_MLP, 2), (HALF_MLP, 10), (HALF_MLP, 20), (HALF_MLP, 30)]):
        a.submit(const(f"t{i}", plan, v), now=0.0)
    step = moved(a, MLP)
    rows = step.shape[0]
    torch.testing.assert_close(step[:rows // 2], torch.full_like(step[:rows // 2], first_half), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step[rows // 2:], torch.full_like(step[rows // 2:], second_half), rtol=1e-6, atol=1e-6)


def test_coordinatewise_matches_numpy_style_references():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 50, generator=gen)
    x[torch.rand(7, 50, generator=gen) < 0.3] = math.nan
    med, n = coordinatewise(x, "median", 0.0)
    trim, _ = coordinatewise(x, "trimmed", 0.25)
    for j in range(50):
        col = sorted(v for v in x[:, j].tolist() if not math.isnan(v))
        assert n[j] == len(col)
        assert med[j].item() == pytest.approx(statistics.median(col) if col else 0.0, abs=1e-6)
        cut = int(0.25 * len(col))
        kept = col[cut:len(col) - cut]
        assert trim[j].item() == pytest.approx(sum(kept) / len(kept) if kept else 0.0, abs=1e-6)


def test_filter_drops_the_update_that_points_away():
    a = agg(k=4, rule="filter", norm_bound="off")
    ups = [const("a", LN, 1.0, tokens=100), const("b", LN, 1.2, tokens=300), const("c", LN, 0.8, tokens=100),
           const("evil", LN, -5.0, tokens=500)]  # median 0.9 > 0: cos(evil, median) = −1
    for u in ups:
        a.submit(u, now=0.0)
    expect = (100 * 1.0 + 300 * 1.2 + 100 * 0.8) / 500  # the token-weighted mean of the other three
    torch.testing.assert_close(moved(a), torch.full((CFG.n_embd,), expect), rtol=1e-6, atol=1e-6)


def test_norm_bound_clips_to_a_multiple_of_the_recent_median():
    a = agg(k=1, norm_multiple=3.0, norm_min_history=4)
    for i, v in enumerate([1.0, 2.0, 2.0, 3.0]):  # median 2 per element
        a.submit(const(f"h{i}", LN, v, base=i), now=0.0)
    before = a.weights["ln_f.bias"].clone()
    a.submit(const("big", LN, 1000.0, base=4), now=0.0)  # clipped to 3 × 2 = 6 per element
    torch.testing.assert_close(before - a.weights["ln_f.bias"], torch.full((CFG.n_embd,), 6.0), rtol=1e-5, atol=1e-4)
    before = a.weights["ln_f.bias"].clone()
    a.submit(const("stale", LN, 1000.0, base=2), now=0.0)  # τ = 3: room shrinks by √(1 + 3) = 2
    # history 1, 2, 2, 3, 6 (the clipped norm is what is remembered): median 2 → 3 × 2 / 2
    torch.testing.assert_close(before - a.weights["ln_f.bias"], torch.full((CFG.n_embd,), 3.0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("phone", [Plan("phone", (0,), 0.5, (MLP,)), Plan("phone", (0,), 1.0, (MLP,))],
                         ids=["another-submodel", "same-submodel"])
def test_a_tier_without_its_own_history_is_not_clipped_by_other_tiers_norms(phone):
    """Issue 11: a GPU node's first updates must not be clipped to the phones' size (its own
    history would then start at their size and stay there), whether the phones train another
    submodel or the very same one (a tier's history is its own: the work differs)."""
    gpu = Plan("gpu", (0,), 1.0, (MLP,))
    a = agg(k=1, norm_multiple=3.0, norm_min_history=4)
    for i in range(8):  # the phones' history: 0.01 per element
        a.submit(const(f"p{i}", phone, 0.01, base=i), now=0.0)
    for i in range(4):  # the node's first four pass whole (RMS 1 and 2: 100-200x the phones')
        before = a.weights[MLP].clone()
        a.submit(const(f"g{i}", gpu, 1.0 + (i % 2), base=a.version), now=0.0)
        torch.testing.assert_close(before - a.weights[MLP], torch.full_like(before, 1.0 + (i % 2)), rtol=1e-5, atol=1e-5)
    before = a.weights[MLP].clone()
    a.submit(const("g-big", gpu, 100.0, base=a.version), now=0.0)  # now its own: 3 × median 1.5
    torch.testing.assert_close(before - a.weights[MLP], torch.full_like(before, 4.5), rtol=1e-5, atol=1e-4)
    before = a.weights[MLP].clone()
    a.submit(const("p-big", phone, 1.0, base=a.version), now=0.0)  # the phones' bound is theirs: 3 × 0.01
    rows = phone.mlp_hidden(CFG)
    torch.testing.assert_close((before - a.weights[MLP])[:rows], torch.full_like(before[:rows], 0.03), rtol=1e-4, atol=1e-6)


def test_norm_bound_refuse_mode_and_absolute_bound():
    a = agg(k=1, norm_bound="refuse", norm_min_history=1)
    a.submit(const("h", LN, 1.0), now=0.0)
    with pytest.raises(BadUpdate, match="exceeds the bound"):
        a.submit(const("big", LN, 4.0, base=1), now=0.0)
    assert a.buffer.count == 0 and "big" not in a.seen
    b = agg(k=1, norm_absolute=math.sqrt(CFG.n_embd) * 0.5)  # ‖Δ‖ ≤ 0.5 √n: 0.5 per element
    b.submit(const("x", LN, 2.0), now=0.0)
    torch.testing.assert_close(moved(b), torch.full((CFG.n_embd,), 0.5), rtol=1e-5, atol=1e-6)


def test_an_update_that_would_overflow_is_refused_and_the_buffer_survives():
    a = agg(k=2)
    a.submit(const("ok", LN, 0.5), now=0.0)
    S = a.S["ln_f.bias"].clone()
    with pytest.raises(BadUpdate, match="overflows float32"):
        a.submit(const("inf", LN, 3e38), now=0.0)  # the row: finite values, overflowing sums
    assert a.buffer.count == 1 and torch.equal(a.S["ln_f.bias"], S) and "inf" not in a.seen
    # Finite norm, but a step the version could not hold (an absurd outer lr makes it reachable).
    b = agg(k=1, lr=1e36, norm_bound="off")
    with pytest.raises(BadUpdate, match="could make the next version non-finite"):
        b.submit(const("huge", LN, 100.0), now=0.0)
    a.submit(const("ok2", LN, 1.5), now=0.0)
    assert a.version == 1 and all(torch.isfinite(t).all() for t in a.weights.values())
    torch.testing.assert_close(moved(a), torch.full((CFG.n_embd,), 1.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["median", "filter"])
def test_a_checkpoint_mid_buffer_keeps_the_buffered_updates(rule):
    a, b = agg(k=3, rule=rule, norm_bound="off"), None
    for i, v in enumerate([1.0, 2.0]):
        a.submit(const(f"t{i}", LN, v), now=0.0)
    tensors, meta = a.state()
    b = Aggregator.from_state(CFG, a.config, tensors, meta, set(a.seen))
    for x in (a, b):
        x.submit(const("t2", LN, 10.0), now=0.0)
    assert torch.equal(a.weights["ln_f.bias"], b.weights["ln_f.bias"])


@pytest.mark.parametrize("block", [None, 257])
def test_filter_over_unequal_plans_matches_a_full_model_oracle(block, monkeypatch):
    """The filter's median is taken over the region the buffer's plans covered (one matrix);
    the oracle takes it per whole tensor, NaN where an update did not cover an element, as the
    rule is defined. Updates of three widths and depths (c_attn's q|k|v groups included), weak
    signal (of either sign) plus noise, so which updates pass depends on every element's median.
    With ``block`` elements the matrix is built and judged in pieces (a block per tensor, each
    split into 21-column slices): the same matrix, the same verdicts."""
    if block is not None:
        monkeypatch.setattr("stamen.server.robust.FILTER_BLOCK", block)
        monkeypatch.setattr("stamen.server.robust_matrix.FILTER_BLOCK", block)
    from stamen.core.plan import tier_plans
    plans = tier_plans(CFG)
    mix = [plans["phone-low"], plans["phone-high"], plans["jetson"], plans["laptop"]] * 3
    gen = torch.Generator().manual_seed(5)
    ups = []
    for i, plan in enumerate(mix):
        shapes, names = plan.shapes(CFG), plan.trainable(CFG)
        ups.append(Update(f"t{i}", 0, plan, {n: 0.3 * ((7 * i) % 5 - 1) + torch.randn(shapes[n], generator=gen) for n in names}, 10 + i))
    a = agg(k=len(ups), rule="filter", min_cosine=0.25, norm_bound="off")
    for u in ups:
        a.submit(u, now=0.0)
    w = w0()
    full = {n: torch.full((len(ups), *t.shape), math.nan) for n, t in w.items()}
    lays = [a._layout(u.plan) for u in ups]
    for i, (u, lay) in enumerate(zip(ups, lays)):
        torch._foreach_copy_(lay.views({n: full[n][i] for n in w}), lay.pieces(u.delta))
    med = {n: coordinatewise(v, "median", 0.0)[0] for n, v in full.items()}
    S, W = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in w.items()}, {n: torch.zeros_like(t, dtype=torch.float64) for n, t in w.items()}
    kept = 0
    blocks = list(filter_blocks(ups, lays, a.S))
    assert (len(blocks) > 1) == (block is not None)
    raw = np.concatenate(blocks, axis=1)
    centres = coordinatewise(torch.from_numpy(raw), "median", 0.0)[0].numpy()
    for i, (u, lay) in enumerate(zip(ups, lays)):
        mine = torch.cat([t.flatten() for t in lay.pieces(u.delta)])
        centre = torch.cat([v.flatten() for v in lay.views(med)])
        covered = ~np.isnan(raw[i])  # the update's columns: its pieces, and their medians, in order
        assert np.array_equal(raw[i][covered], mine.numpy()) and np.array_equal(centres[covered], centre.numpy())
        mine, centre = mine.double(), centre.double()
        if float(mine @ centre) / float(mine.norm() * centre.norm()) >= 0.25:
            kept += 1
            for s, x in zip(lay.views(S), lay.pieces(u.delta)):
                s += u.tokens * x.double()
            for s in lay.views(W):
                s += u.tokens
    assert 0 < kept < len(ups)  # the threshold splits the buffer: the test can tell the medians apart
    for n in w:
        expect = torch.where(W[n] > 0, S[n] / W[n].clamp_min(1e-300), 0.0).float()
        torch.testing.assert_close(w[n] - a.weights[n], expect, rtol=1e-5, atol=1e-5)


def test_median_is_numpys_to_the_bit():
    """Even and odd k, with and without uncovered (NaN) elements: numpy's median and nanmedian."""
    gen = torch.Generator().manual_seed(4)
    for k in (1, 4, 7, 50):
        x = torch.randn(k, 300, generator=gen)
        med, n = coordinatewise(x, "median", 0.0)
        assert np.array_equal(med.numpy(), np.median(x.numpy(), axis=0)) and bool((n == k).all())
        x[torch.rand(k, 300, generator=gen) < 0.3] = math.nan
        x[:, 0] = math.nan  # nobody covered it: 0
        med, n = coordinatewise(x, "median", 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the all-NaN column
            want = np.nan_to_num(np.nanmedian(x.numpy(), axis=0), nan=0.0)
        assert np.array_equal(med.numpy(), want) and torch.equal(n, (~x.isnan()).sum(0))



def test_full_median_is_the_sorted_median_to_the_bit():
    """``full_median`` (the filter's median when every update covered every column) skips the
    sort of columns whose middle ranks are zeros: the same values as sorting every column, for
    even and odd k, on sparse matrices (top-k-like: most of a column zero, some columns
    mostly below or above 0, ties among the zeros at the middle ranks) and dense ones."""
    from stamen.server.robust import full_median
    gen = np.random.default_rng(3)
    for k in (1, 2, 7, 50):
        for keep in (0.03, 0.5, 1.0):
            x = gen.standard_normal((k, 4000)).astype(np.float32)
            x[gen.random((k, 4000)) >= keep] = 0
            x[:, :40] = np.where(x[:, :40] != 0, -np.abs(x[:, :40]), 0)  # columns whose middle ranks are below 0
            x[:, 40:80] = np.abs(x[:, 40:80])  # ... and above it
            x[: k // 2, 80:120] = 0  # half zeros exactly at the middle
            want = coordinatewise(torch.from_numpy(x.copy()), "median", 0.0)[0].numpy()
            assert np.array_equal(full_median(x.copy()).view(np.int32), want.view(np.int32)), (k, keep)
            x[:, 120:160] = -0.0  # a zero's sign is the one difference: equal values
            want = coordinatewise(torch.from_numpy(x.copy()), "median", 0.0)[0].numpy()
            assert np.array_equal(full_median(x.copy()), want), (k, keep)


def test_norm_bound_reads_the_window_median_as_statistics_does():
    """The bound keeps each plan's window sorted as it slides (old norms leave, ties included)
    instead of sorting it per request: the same median, to the bit, as ``statistics.median``."""
    from stamen.server.robust import NormHistory
    c = DefenceConfig(norm_window=5, norm_min_history=1)
    h, window = NormHistory(c), []
    gen = np.random.default_rng(2)
    for i in range(40):
        norm = float(gen.choice([1.0, 2.5, 3.0])) if i % 3 else float(gen.random())  # repeats, so ties
        h.record("p", norm, 4)
        window = (window + [norm / 2])[-5:]
        assert h.bound("p", 4, 0) == c.norm_multiple * statistics.median(window) * 2
    assert NormHistory(c, h.state()).bound("p", 4, 3) == h.bound("p", 4, 3)  # a checkpoint restores it


def test_filter_rows_read_from_the_decoders_buffer_are_the_tensors():
    """A decoded update carries its tensors end to end (``Update.flat``, from ``Payload.flat``),
    and the filter copies a row it covers whole from there: the matrix, so the verdicts, is the
    one its tensors give."""
    from stamen.compression.codecs import decode, encode
    from stamen.core.plan import tier_plans
    plan = tier_plans(CFG)["phone-low"]
    shapes, names = plan.shapes(CFG), plan.trainable(CFG)
    a = agg(k=10, rule="filter", norm_bound="off")
    gen = torch.Generator().manual_seed(3)
    ups, plain = [], []
    for i in range(5):
        p = decode(encode({n: torch.randn(shapes[n], generator=gen) for n in names}, "topk(0.1)+int8(block=64)"))
        assert list(p.tensors) == [n for n in a.S if n in p.tensors]  # the model's order: the row's
        assert np.array_equal(p.flat, torch.cat([t.reshape(-1) for t in p.tensors.values()]).numpy())
        ups.append(Update(f"t{i}", 0, plan, p.tensors, 100, flat=torch.from_numpy(p.flat)))
        plain.append(Update(f"t{i}", 0, plan, {n: t.clone() for n, t in p.tensors.items()}, 100))
    lays = [a._layout(plan)] * len(ups)
    got = np.concatenate(list(filter_blocks(ups, lays, a.S)), axis=1)
    want = np.concatenate(list(filter_blocks(plain, lays, a.S)), axis=1)
    assert not np.isnan(got).any() and np.array_equal(got, want)
