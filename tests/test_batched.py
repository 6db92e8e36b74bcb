"""Acceptance 1 of the simulator: training many devices batched along a device axis gives
each device what ``core.train.train_steps`` gives it alone."""

import copy

import pytest
import torch

from stamen.core.data import Corpus, Shard
from stamen.core.errors import UserError
from stamen.core.model import GPT, PRESETS, weights
from stamen.core.train import TrainConfig, train_steps
from stamen.simulator.batched import _Inputs, train_batched

CFG = PRESETS["gpt-tiny"]
N_DEVICES, STEPS, BATCH, SEQ = 5, 3, 2, 16


@pytest.fixture(scope="module")
def shards() -> list[Shard]:
    """Five devices with different text, so their gradients differ."""
    rng = torch.Generator().manual_seed(0)
    docs = [(f"g{i}", f"d{i}", bytes(torch.randint(32 + 10 * i, 60 + 10 * i, (400,), generator=rng).tolist()))
            for i in range(N_DEVICES)]
    corpus = Corpus.from_documents(docs)
    return [Shard(corpus, corpus.doc_bounds[i:i + 1]) for i in range(N_DEVICES)]


def submodel(frozen: tuple[str, ...] = ("blocks.1.",)) -> GPT:
    """A width-reduced two-block submodel with one frozen block, as a phone plan trains; width
    aside, a rotating tier's bottom window too (``core.plan.rotating_windows``: the embeddings,
    the lower block and ln_f train, their gradient flowing through the frozen block between)."""
    torch.manual_seed(1)
    model = GPT(CFG, block_ids=(1, 3), n_head=2, mlp_hidden=128)
    for name, p in model.named_parameters():
        if name.startswith(frozen):
            p.requires_grad_(False)
    return model


@pytest.mark.parametrize("train", [
    TrainConfig(lr=3e-3, warmup_steps=2, total_steps=6, grad_clip=0.05),  # clipping binds
    TrainConfig(lr=3e-3, warmup_steps=2, total_steps=6, grad_clip=0.0, weight_decay=0.5),
    TrainConfig(optimizer="sgd", lr=0.5, momentum=0.9, schedule="constant", grad_clip=1.0),
])
def test_batched_equals_each_device_alone(shards, train):
    model = submodel()
    base = {k: v.clone() for k, v in weights(model).items()}
    result = train_batched(model, [s.batches(BATCH, SEQ, seed=d) for d, s in enumerate(shards)],
                           STEPS, train, step_offset=1)
    assert all(torch.equal(weights(model)[k], base[k]) for k in base), "the template model must not change"
    assert set(result.weights) == {k for k, p in model.named_parameters() if p.requires_grad}
    assert result.tokens == STEPS * BATCH * SEQ
    for d, shard in enumerate(shards):
        alone = copy.deepcopy(model)
        ref = train_steps(alone, shard.batches(BATCH, SEQ, seed=d), STEPS, train, step_offset=1)
        torch.testing.assert_close(result.losses[d], torch.tensor(ref.losses), rtol=0, atol=1e-5)
        own = weights(alone)
        # Adam divides by sqrt(v): where a gradient is ~0, float-order noise in it moves the
        # element by up to ~lr. 1e-4 (3% of lr) still catches any wrong gradient (~1e-3).
        atol = 1e-4 if train.optimizer == "adamw" else 2e-5
        delta = result.deltas(base)[d]
        for name in result.weights:
            torch.testing.assert_close(result.weights[name][d], own[name], rtol=0, atol=atol)
            torch.testing.assert_close(delta[name], base[name] - own[name], rtol=0, atol=atol)
            assert not torch.equal(own[name], base[name]), f"{name} did not train"


@pytest.mark.parametrize("frozen", [("wte.", "wpe."), ("wte.", "wpe.", "blocks.1."),
                                    ("wte.", "wpe.", "blocks.1.", "ln_f.")])  # the last: a window plan's
def test_batched_equals_alone_with_frozen_embeddings(shards, frozen):
    """As the tier plans train: the embeddings (and here the head tied to them) are frozen, so
    the first block's input and its ln_1 output come from per-(token, position) tables, with
    that ln_1's affine each device's own (folded into c_attn) or frozen and shared."""
    model, train, batch, seq = submodel(frozen), TrainConfig(lr=3e-3, warmup_steps=2, total_steps=6), 64, 8
    every = {k: p.detach() for k, p in model.named_parameters()}
    assert _Inputs.build(model, every, seq, len(shards) * batch * seq) is not None, "the tables must be used"
    result = train_batched(model, [s.batches(batch, seq, seed=d) for d, s in enumerate(shards)], STEPS, train)
    for d, shard in enumerate(shards):
        alone = copy.deepcopy(model)
        ref = train_steps(alone, shard.batches(batch, seq, seed=d), STEPS, train)
        torch.testing.assert_close(result.losses[d], torch.tensor(ref.losses), rtol=0, atol=1e-5)
        own = weights(alone)
        for name in result.weights:
            torch.testing.assert_close(result.weights[name][d], own[name], rtol=0, atol=1e-4)
            assert not torch.equal(own[name], every[name]), f"{name} did not train"


def test_threads_split_devices_without_changing_results(shards):
    """Two threads train the group in two parts, each as one thread trains it."""
    train = TrainConfig(lr=3e-3, warmup_steps=2, total_steps=6)
    one = train_batched(submodel(), [s.batches(BATCH, SEQ, seed=d) for d, s in enumerate(shards)], STEPS, train)
    torch.set_num_threads(2)
    try:
        two = train_batched(submodel(), [s.batches(BATCH, SEQ, seed=d) for d, s in enumerate(shards)], STEPS, train)
    finally:
        torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    assert torch.equal(two.losses, one.losses)
    assert two.weights.keys() == one.weights.keys()
    for name in one.weights:
        assert torch.equal(two.weights[name], one.weights[name]), name


def test_devices_really_differ(shards):
    """Guards the equality test above: different data must give different updates."""
    train = TrainConfig(warmup_steps=1, total_steps=4)
    result = train_batched(submodel(), [s.batches(BATCH, SEQ, seed=0) for s in shards], 2, train)
    w = result.weights["blocks.3.mlp.c_fc.weight"]
    assert (w[0] - w[1]).abs().max() > 1e-4


def test_rejects_empty_group():
    with pytest.raises(UserError):
        train_batched(submodel(), [], 2, TrainConfig())
