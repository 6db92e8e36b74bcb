"""Central DP for the buffer: ε from Opacus's RDP accountant equals the library's own
high-level accountant and a hand computation of the Gaussian mechanism's RDP conversion; the
aggregator clips, weighs 1, adds noise of σ·C to the covered sum only, and stops at the budget."""

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from stamen.core.model import GPT, PRESETS, weights
from stamen.core.plan import Plan
from stamen.core.records import Update
from stamen.core.errors import UserError
from stamen.server.aggregator import Aggregator, AggregatorConfig, BadUpdate
from stamen.server.config import load_config
from stamen.server.outer import OuterConfig
from stamen.server.privacy import ORDERS, PrivacyConfig, epsilon
from stamen.server.robust import DefenceConfig

CFG = PRESETS["gpt-tiny"]
LN = Plan("ln", (0,), 1.0, ("ln_f.bias",))


@pytest.mark.parametrize("sigma, flushes, delta", [(1.0, 1, 1e-5), (1.1, 100, 1e-5), (0.8, 1000, 1e-6), (4.0, 30, 1e-3)])
def test_epsilon_is_the_librarys_own(sigma, flushes, delta):
    acc = RDPAccountant()
    acc.history = [(sigma, 1.0, flushes)]  # (noise multiplier, sample rate, steps)
    assert epsilon(sigma, flushes, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)


def test_one_gaussian_mechanism_by_hand():
    """T Gaussian mechanisms of sensitivity 1 and noise σ have RDP T·α/(2σ²) at order α
    (Mironov 2017, Prop. 7 and composition); Balle et al. 2020's conversion gives
    ε = min over α of  rdp(α) + log((α−1)/α) − (log δ + log α)/(α − 1)."""
    sigma, flushes, delta = 2.0, 10, 1e-5
    by_hand = min(flushes * a / (2 * sigma**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
                  for a in ORDERS)
    assert epsilon(sigma, flushes, delta) == pytest.approx(by_hand, rel=1e-9)
    # and below the classical bound ε ≤ T/(2σ²) + √(2T log(1/δ))/σ (Dwork & Roth, via RDP)
    assert by_hand < flushes / (2 * sigma**2) + math.sqrt(2 * flushes * math.log(1 / delta)) / sigma


def dp_agg(k, **privacy):
    torch.manual_seed(0)
    w0 = {n: t.clone() for n, t in weights(GPT(CFG)).items()}
    cfg = AggregatorConfig(buffer_k=k, tau_max=4, outer=OuterConfig("fedavg", lr=1.0),
                           defence=DefenceConfig(rule="mean"), privacy=PrivacyConfig(enabled=True, seed=7, **privacy))
    return w0, Aggregator(CFG, w0, cfg)


def const(task, value, tokens=100, base=0):
    return Update(task, base, LN, {"ln_f.bias": torch.full((CFG.n_embd,), float(value))}, tokens)


def test_flush_is_clipped_unweighted_mean_plus_noise_of_sigma_c():
    n = CFG.n_embd
    w0, a = dp_agg(k=2, clip=math.sqrt(n) * 0.5, noise_multiplier=0.3)  # C: 0.5 per element
    a.submit(const("a", 0.2, tokens=10), now=0.0)  # under C: as is
    a.submit(const("b", 3.0, tokens=990), now=0.0)  # clipped to 0.5 per element; tokens do not weigh
    noise = torch.randn(n, generator=torch.Generator().manual_seed(7 + 0)) * (0.3 * math.sqrt(n) * 0.5)
    expect = (0.2 + 0.5 + noise) / 2
    torch.testing.assert_close(w0["ln_f.bias"] - a.weights["ln_f.bias"], expect, rtol=1e-5, atol=1e-6)
    for name in w0:
        if name != "ln_f.bias":
            assert torch.equal(a.weights[name], w0[name]), name  # no noise where nobody trained
    assert a.dp_flushes == 1 and a.epsilon() == epsilon(0.3, 1, 1e-5)


def test_training_stops_when_the_budget_is_spent():
    budget = (epsilon(2.0, 3, 1e-5) + epsilon(2.0, 4, 1e-5)) / 2  # room for three flushes, not four
    _, a = dp_agg(k=1, noise_multiplier=2.0, budget=budget)
    for v in range(3):
        a.submit(const(f"t{v}", 0.1, base=v), now=0.0)
    assert a.version == 3 and a.privacy_spent
    with pytest.raises(BadUpdate, match="privacy budget is spent"):
        a.submit(const("t3", 0.1, base=3), now=0.0)
    assert a.epsilon() <= budget


def test_privacy_with_a_robust_rule_stops_at_load(tmp_path):
    """The packaged federation filters outliers; with DP on that would let one device decide
    whether another's update counts, so the file must say rule = "mean" (one line, no start)."""
    path = tmp_path / "fed.toml"
    path.write_text("[privacy]\nenabled = true\n")
    with pytest.raises(UserError, match='needs \\[defence\\] rule = "mean", not \'filter\''):
        load_config(path)
    path.write_text('[privacy]\nenabled = true\n[defence]\nrule = "mean"\n')
    assert load_config(path).aggregator_config().privacy.enabled
