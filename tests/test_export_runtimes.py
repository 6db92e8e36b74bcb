"""Acceptance 1 and 2 of the export issue: ORT and ExecuTorch bundles train a plan's submodel
exactly like eager torch (same weights, same batches), and take a new version's weights
without re-export.

Four plan kinds, each on both runtimes: "blocks" trains everything, the tied embedding/head
included; "width" is the phone-high tier's plan (half the heads and hidden units of its blocks,
embeddings frozen) at the tier's 8 x 64 -- the very programs test_bundle_device and
test_client_runtimes export, shared through the session's export cache; "window" keeps the
whole model and trains its last two blocks only (``core.plan.window_plan``: the blocks below,
ln_f and the embeddings frozen); "bottom" is a rotating tier's bottom window
(``core.plan.rotating_windows``): the embeddings (the head tied to them), blocks 0-1 and ln_f
train, the gradient flowing back through the frozen blocks 2-3 between them. ExecuTorch runs with
XNNPACK (its default) on the tier and window plans, and on its portable kernels alone on the blocks plan."""

import pytest
import torch

from stamen.core.model import GPT, PRESETS, ModelSpec, load_weights, weights
from stamen.core.plan import Plan, rotating_windows, tier_plans, window_plan
from stamen.core.train import TrainConfig, train_steps
from stamen.edge_client.executorch_runtime import ExecuTorchRuntime
from stamen.edge_client.ort_runtime import OrtRuntime
from stamen.mobile_bridge.bundle import cached_bundle

SPEC = ModelSpec("gpt-tiny")
CFG = PRESETS["gpt-tiny"]
STEPS = 20
PLANS = {  # plan, batch, seq, ExecuTorch with XNNPACK
    "blocks": (Plan("blocks", (0, 2), 1.0, ("*",)), 4, 32, False),
    "width": (tier_plans(CFG)["phone-high"], 8, 64, True),
    "window": (window_plan(CFG, "window", 2), 4, 32, True),
    "bottom": (rotating_windows(CFG, "rotate", 2)[0], 4, 32, True),
}
RUNTIMES = {"ort": OrtRuntime, "executorch": ExecuTorchRuntime}
EXPORTS = [dict(spec=SPEC, plan=plan, runtime=r, batch_size=b, seq_len=t, xnnpack=xnnpack)  # made ahead: conftest.py
           for plan, b, t, xnnpack in PLANS.values() for r in RUNTIMES]
CASES = [pytest.param(p, r, id=f"{p}-{r}" + ("" if r == "ort" else "-xnnpack" if PLANS[p][3] else "-portable"))
         for p in PLANS for r in RUNTIMES]
SGD = TrainConfig(optimizer="sgd", lr=0.5, warmup_steps=5, total_steps=STEPS, grad_clip=1.0)


def global_weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {n: t.clone() for n, t in weights(GPT(CFG)).items()}


def batches(seed: int, n: int, plan_name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    _, b, t, _ = PLANS[plan_name]
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 96, (n, b, t + 1), generator=g) + 32  # printable bytes
    return [(x[:, :-1], x[:, 1:]) for x in w]


def eager(plan: Plan, sub: dict, data: list, cfg: TrainConfig, dtype: torch.dtype = torch.float32):
    """Eager torch's losses and pseudo-gradient (base - trained) from ``sub``, in ``dtype``."""
    model = plan.build(CFG).to(dtype)
    load_weights(model, {n: t.to(dtype) for n, t in sub.items()})
    res = train_steps(model, iter(data), len(data), cfg)
    return res, {n: sub[n].to(dtype) - p.detach() for n, p in model.named_parameters() if n in plan.trainable(CFG)}


@pytest.fixture(scope="module")
def bundles(export_cache):
    return {(p, r): cached_bundle(SPEC, plan, r, b, t, export_cache, xnnpack=xnnpack)
            for p, (plan, b, t, xnnpack) in PLANS.items() for r in RUNTIMES}


def runtime(bundles, plan_name: str, name: str):
    plan = PLANS[plan_name][0]
    return RUNTIMES[name](bundles[plan_name, name], SPEC.hash, plan.hash)


def rel_l2(got: dict, want: dict) -> float:
    """Relative L2 error over the whole pseudo-gradient (all tensors as one vector, in float64).
    Per tensor it is meaningless for LayerNorm gains: Δ ~ 1e-4 taken from values ~ 1 keeps
    only ~3 significant digits in float32 whichever runtime trained."""
    err = sum(float((got[n].double() - want[n].double()).square().sum()) for n in want)
    return (err / sum(float(want[n].double().square().sum()) for n in want)) ** 0.5


@pytest.mark.parametrize("plan_name, name", CASES)
def test_sgd_parity_with_eager(bundles, plan_name, name):
    """The pseudo-gradient (what a client uploads) stands closer to eager float32's than eager
    float32's stands to float64's: a runtime differs from eager torch by less than float32
    rounding moves the result. Measured: 0.10-0.26 of that distance (1.1e-6 on blocks, 4.5e-6
    on phone-high); the XNNPACK program with the erf GELU stood at 2.1 (9.3e-6), which a fixed
    1e-4 had let through."""
    plan = PLANS[plan_name][0]
    base = plan.extract(global_weights(0), CFG)
    data = batches(1, STEPS, plan_name)
    want, want_delta = eager(plan, base, data, SGD)
    _, exact = eager(plan, base, data, SGD, torch.float64)
    rt = runtime(bundles, plan_name, name)
    rt.set_weights(base)
    got = rt.train(iter(data), STEPS, SGD)
    assert got.steps == STEPS and got.tokens == STEPS * data[0][1].numel()
    for a, b in zip(got.losses, want.losses):
        assert abs(a - b) <= 1e-4 * abs(b)
    got_w = rt.trained_weights()
    assert set(got_w) == set(plan.trainable(CFG))
    unit = rel_l2(want_delta, exact)
    assert unit <= 1e-4  # the float64 reference agrees with float32 to rounding
    assert rel_l2({n: base[n] - got_w[n] for n in got_w}, want_delta) <= unit
    assert want.losses[-1] < want.losses[0]  # it did learn something


@pytest.mark.parametrize("plan_name, name", CASES)
def test_adamw_parity_with_eager(bundles, plan_name, name):
    """AdamW's pseudo-gradient is checked against eager torch in float64, with eager float32's
    own distance from it as the unit: a runtime may round as much as eager float32 does, no
    more -- not a fixed tolerance against eager float32.

    Why: AdamW divides each step by the gradient's running RMS, so it turns rounding noise on a
    gradient that is zero in exact arithmetic into steps of ~lr. The attention key bias has one
    (it shifts all of a query's scores alike, which softmax ignores). On the phone-high plan,
    eager float32 lands 8.9e-6 (relative L2) from float64, 88% of it in the key biases; ORT 8.4e-6,
    ExecuTorch-XNNPACK 6.2e-6. On the blocks plan: 9.8e-6 (97%); ORT 1.3e-5, ExecuTorch-portable
    9.7e-6. Measured this way, the XNNPACK program once stood 1.9e-4 from float64, 21x eager
    float32 (its step-1 gradients 8e-6 off, eager float32's 2e-7): it ran the MLP's tanh GELU as
    XNNPACK's erf GELU (``export.executorch._tanh_gelu``), which a fixed 1e-4 against eager
    float32 had let through at B=4 x T=32 (3.2e-5)."""
    plan = PLANS[plan_name][0]
    cfg = TrainConfig(optimizer="adamw", lr=1e-2, warmup_steps=2, total_steps=10)
    base = plan.extract(global_weights(2), CFG)
    data = batches(3, 8, plan_name)
    want, want_delta = eager(plan, base, data, cfg)
    _, exact = eager(plan, base, data, cfg, torch.float64)
    rt = runtime(bundles, plan_name, name)
    rt.set_weights(base)
    got = rt.train(iter(data), len(data), cfg, step_offset=0)
    assert got.losses == pytest.approx(want.losses, rel=1e-4)
    unit = rel_l2(want_delta, exact)
    assert unit <= 1e-4  # the float64 reference agrees with float32 to rounding
    assert rel_l2({n: base[n] - w for n, w in rt.trained_weights().items()}, exact) <= 2 * unit


@pytest.mark.parametrize("name", RUNTIMES)
def test_new_version_weights_without_reexport(bundles, name):
    plan = PLANS["blocks"][0]
    rt = runtime(bundles, "blocks", name)
    rt.set_weights(plan.extract(global_weights(4), CFG))
    rt.train(iter(batches(5, 3, "blocks")), 3, SGD)
    program = sorted(bundles["blocks", name].iterdir())
    stamps = [f.stat().st_mtime_ns for f in program]
    newer = plan.extract(global_weights(6), CFG)  # "version 2": other values everywhere
    rt.set_weights(newer)
    data = batches(7, 1, "blocks")
    want, _ = eager(plan, newer, data, SGD)
    got = rt.train(iter(data), 1, SGD, step_offset=3)
    assert got.losses[0] == pytest.approx(want.losses[0], rel=1e-5)
    assert [f.stat().st_mtime_ns for f in program] == stamps  # nothing re-exported or rewritten
