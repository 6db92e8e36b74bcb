"""LoRA plans on the on-device runtimes (issue 14, acceptance 1): an ORT and an ExecuTorch bundle
of a LoRA plan over a stamen GPT base train like eager torch (same adapter, same batches: losses
within 1e-4 relative per step, the uploaded pseudo-gradient within 1e-4), carry the frozen base
inside the bundle and take only the adapter per version."""

import pytest
import torch

from stamen.core.lora import TRAIN, LoraPlan, adapter_weights, load_adapter, lora_space
from stamen.core.model import GPT, GPTConfig, ModelSpec
from stamen.core.train import TrainConfig, train_steps
from stamen.edge_client.executorch_runtime import ExecuTorchRuntime
from stamen.edge_client.ort_runtime import OrtRuntime
from stamen.mobile_bridge.bundle import write_bundle

CFG = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)  # small: ExecuTorch exports are slow
B, T, STEPS = 2, 32, 8
PLANS = {"fedavg": LoraPlan("lora-fedavg", 4, train=TRAIN["fedavg"]),
         "exact": LoraPlan("lora-exact", 2, train=TRAIN["exact"])}
RUNTIMES = {"ort": OrtRuntime, "executorch": ExecuTorchRuntime}
CASES = [("fedavg", "ort"), ("exact", "ort"), ("fedavg", "executorch")]


def base_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


SPACE = lora_space(base_model(), 4)


def built(plan: LoraPlan):
    return plan.build(base_model(), SPACE)


def adapter(plan: LoraPlan, seed: int, trained: bool) -> dict[str, torch.Tensor]:
    """The plan's slice of a global adapter: the starting one (B = 0), or one with B != 0 as
    after some versions."""
    g = torch.Generator().manual_seed(seed)
    full = {n: t if n.endswith("lora_A") or not trained else torch.randn(t.shape, generator=g) * 0.05
            for n, t in SPACE.init(seed).items()}
    return plan.extract(full, SPACE)


def batches(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 96, (n, B, T + 1), generator=g) + 32
    return [(b[:, :-1], b[:, 1:]) for b in w]


def eager(plan, sub, data, cfg):
    model = built(plan)
    load_adapter(model, sub)
    res = train_steps(model, iter(data), len(data), cfg)
    return res, {n: t.clone() for n, t in adapter_weights(model).items() if n in plan.trainable(SPACE)}


def rel_l2(got: dict, want: dict) -> float:
    err = sum(float((got[n] - want[n]).square().sum()) for n in want)
    return (err / sum(float(want[n].square().sum()) for n in want)) ** 0.5


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-bundles")
    out = {}
    for plan_name, runtime in CASES:
        plan = PLANS[plan_name]
        folder = root / f"{plan_name}-{runtime}"
        write_bundle(built(plan), ModelSpec("gpt-tiny"), plan, runtime, folder, B, T, xnnpack=False)
        out[plan_name, runtime] = folder
    return out


@pytest.mark.parametrize("plan_name,runtime", CASES)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lora_parity_with_eager(bundles, plan_name, runtime, optimizer):
    plan = PLANS[plan_name]
    rt = RUNTIMES[runtime](bundles[plan_name, runtime], plan_hash=plan.hash)
    assert {s.name for s in rt.manifest.params} == set(plan.shapes(SPACE))  # only the adapter travels
    cfg = TrainConfig(optimizer=optimizer, lr=0.5 if optimizer == "sgd" else 1e-2, warmup_steps=2,
                      total_steps=STEPS, grad_clip=1.0)
    for version, trained in enumerate((False, True)):  # the starting adapter (B = 0), then a later one
        sub = adapter(plan, version, trained)
        data = batches(version, STEPS)
        want, want_w = eager(plan, sub, data, cfg)
        rt.set_weights(sub)
        got = rt.train(iter(data), STEPS, cfg)
        for a, b in zip(got.losses, want.losses):
            assert abs(a - b) <= 1e-4 * abs(b)
        got_w = rt.trained_weights()
        assert set(got_w) == set(plan.trainable(SPACE))
        assert rel_l2({n: sub[n] - got_w[n] for n in got_w}, {n: sub[n] - want_w[n] for n in want_w}) <= 1e-4
        assert max(float((got_w[n] - sub[n]).abs().max()) for n in got_w) > 1e-4  # it trained (random bytes: the loss need not fall)


