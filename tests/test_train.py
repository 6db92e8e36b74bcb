import math

import pytest
import torch

from stamen.core.errors import UserError
from stamen.core.model import GPT, PRESETS, weights
from stamen.core.train import TrainConfig, compute_dtype, evaluate, lr_at, train_steps


def test_schedule_warmup_cosine_and_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    assert lr_at(cfg, 110) == pytest.approx(0.1) and lr_at(cfg, 10_000) == pytest.approx(0.1)


def test_global_step_offset_continues_one_schedule(stdlib):
    """Two calls of 3 steps with offsets 0 and 3 equal one call of 6 steps."""
    _, train, _ = stdlib
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, total_steps=6)
    torch.manual_seed(0)
    a = GPT(PRESETS["gpt-tiny"])
    b = GPT(PRESETS["gpt-tiny"])
    b.load_state_dict(a.state_dict())
    train_steps(a, train.batches(2, 16, seed=0), 6, cfg)
    stream = train.batches(2, 16, seed=0)
    from stamen.core.train import make_optimizer

    opt = make_optimizer(b, cfg)
    train_steps(b, stream, 3, cfg, optimizer=opt, step_offset=0)
    train_steps(b, stream, 3, cfg, optimizer=opt, step_offset=3)
    for n, w in weights(a).items():
        assert torch.allclose(w, weights(b)[n], atol=1e-6), n


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_lowers_validation_loss(stdlib, optimizer):
    _, train, val = stdlib
    torch.manual_seed(0)
    model = GPT(PRESETS["gpt-tiny"])
    batches = val.fixed_batches(4, 8, 64)
    before = evaluate(model, batches)
    cfg = TrainConfig(optimizer=optimizer, lr=3e-3 if optimizer == "adamw" else 0.5, warmup_steps=5, total_steps=60)
    res = train_steps(model, train.batches(8, 64, seed=0), 60, cfg)
    assert res.tokens == 60 * 8 * 64 and len(res.losses) == 60
    assert evaluate(model, batches) < before - 1.0


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError):
        TrainConfig(optimizer="lion")
    with pytest.raises(UserError):
        TrainConfig(lr=0)


@pytest.mark.parametrize("capability, dtype", [((9, 0), torch.bfloat16), ((8, 7), torch.bfloat16),
                                               ((8, 0), torch.bfloat16), ((7, 5), torch.float32),
                                               ((7, 0), torch.float32), ((6, 1), torch.float32)])
def test_bf16_only_on_cards_with_bf16_matmuls(monkeypatch, capability, dtype):
    """H100/H200, Jetson Orin and A100 compute in bf16; T4 and RTX 20xx (7.5), V100 (7.0) and
    Pascal cards, which would only emulate it, in fp32. There is no CUDA card here: the card's
    compute capability is a stand-in (``torch.cuda.get_device_capability`` faked)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert compute_dtype(torch.device("cuda")) == dtype
    assert compute_dtype(torch.device("cuda", 1)) == dtype
    assert compute_dtype(torch.device("cpu")) == torch.float32
