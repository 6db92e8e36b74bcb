"""TorchRuntime against train_steps on the same module, optimizer kept across tasks; the
hardware probe's Jetson detection and memory declarations."""

import torch

from stamen.core.data import stdlib_corpus
from stamen.core.model import GPT, PRESETS, load_weights, weights
from stamen.core.plan import tier_plans
from stamen.core.train import TrainConfig, make_optimizer, train_steps
from stamen.edge_client.probe import Hardware, capabilities, jetson_board
from stamen.edge_client.runtime import TorchRuntime

CFG = PRESETS["gpt-tiny"]


def test_torch_runtime_matches_train_steps_and_keeps_adamw_state():
    torch.manual_seed(0)
    plan = tier_plans(CFG)["phone-high"]
    glob = weights(GPT(CFG))
    shard, _ = stdlib_corpus().split()
    tc = TrainConfig(lr=1e-2, warmup_steps=2, total_steps=20)
    rt = TorchRuntime(CFG, plan, keep_optimizer=True)
    ref = plan.build(CFG)
    load_weights(ref, plan.extract(glob, CFG))
    opt = make_optimizer(ref, tc)
    for task in range(2):  # two tasks: the kept moments must carry over identically
        rt.set_weights(plan.extract(glob, CFG))
        load_weights(ref, plan.extract(glob, CFG))
        res = rt.train(shard.batches(2, 16, seed=task), 3, tc, step_offset=3 * task)
        want = train_steps(ref, shard.batches(2, 16, seed=task), 3, tc, optimizer=opt, step_offset=3 * task)
        assert res.losses == want.losses
    out = rt.trained_weights()
    assert sorted(out) == sorted(plan.trainable(CFG))
    params = dict(ref.named_parameters())
    for n, t in out.items():
        assert torch.equal(t, params[n].detach())
    assert rt.optimizer.state  # moments exist and were reused (same losses as the kept optimizer)


def test_a_saved_optimizer_resumes_exactly_in_a_new_runtime(tmp_path):
    """A Flower SuperNode runs each task in a new process: the saved AdamW state must make
    task 2 in a fresh runtime identical to task 2 in the runtime that kept it; a changed
    setting does not resume."""
    torch.manual_seed(0)
    plan = tier_plans(CFG)["laptop"]
    glob = weights(GPT(CFG))
    shard, _ = stdlib_corpus().split()
    tc = TrainConfig(lr=1e-2, warmup_steps=2, total_steps=20)
    kept, path = TorchRuntime(CFG, plan, keep_optimizer=True), tmp_path / "opt.pt"
    kept.set_weights(plan.extract(glob, CFG))
    kept.train(shard.batches(2, 16, seed=0), 3, tc)
    kept.save_optimizer(path)
    fresh = TorchRuntime(CFG, plan, keep_optimizer=True)
    assert not fresh.load_optimizer(path, TrainConfig(lr=5e-3, warmup_steps=2, total_steps=20))
    assert fresh.load_optimizer(path, tc)
    for rt in (kept, fresh):
        rt.set_weights(plan.extract(glob, CFG))
    a = kept.train(shard.batches(2, 16, seed=1), 3, tc, step_offset=3)
    b = fresh.train(shard.batches(2, 16, seed=1), 3, tc, step_offset=3)
    assert a.losses == b.losses
    assert all(torch.equal(kept.trained_weights()[n], t) for n, t in fresh.trained_weights().items())
    assert not TorchRuntime(CFG, plan, keep_optimizer=True).load_optimizer(tmp_path / "none.pt", tc)


def test_jetson_detection(tmp_path):
    assert jetson_board(tmp_path) == ""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R35 (release), REVISION: 3.1, GCID: 1\n")
    assert jetson_board(tmp_path) == "R35 (release), REVISION: 3.1, GCID: 1"
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    assert jetson_board(tmp_path) == "NVIDIA Jetson AGX Orin Developer Kit"


def test_capabilities_memory():
    hw = Hardware(8 * 2**30, 16 * 2**30, 4, "", 0, "NVIDIA Jetson Orin")
    c = capabilities(hw, "device", ("torch",), 1e9)
    assert c.memory_bytes == 4 * 2**30 and c.accelerator == "jetson:NVIDIA Jetson Orin"
    assert capabilities(hw, "device", ("torch",), 1e9, max_memory=2**20).memory_bytes == 2**20
    gpu = Hardware(8 * 2**30, 16 * 2**30, 4, "H100", 80 * 2**30, "")
    c = capabilities(gpu, "gpu", ("torch",), 1e14)
    assert c.memory_bytes == 80 * 2**30 and c.accelerator == "cuda:H100"


def test_capabilities_device_class():
    jetson = Hardware(8 * 2**30, 16 * 2**30, 4, "", 0, "NVIDIA Jetson Orin")
    gpu = Hardware(8 * 2**30, 16 * 2**30, 4, "H100", 80 * 2**30, "")
    plain = Hardware(8 * 2**30, 16 * 2**30, 4, "", 0, "")
    assert capabilities(jetson, "device", ("torch",), 1e9).device_class == "jetson"
    assert capabilities(gpu, "gpu", ("torch",), 1e14).device_class == "gpu"
    assert capabilities(gpu, "device", ("torch",), 1e14).device_class == "laptop"  # a CUDA box training as a device
    assert capabilities(plain, "gpu", ("torch",), 1e9).device_class == "laptop"  # no CUDA: not a gpu-class node
    assert capabilities(plain, "device", ("torch",), 1e9).device_class == "laptop"
