"""The GPU-node path on a real CUDA device: bf16 autocast over fp32 master weights against
fp32 on the CPU, the runtime's kept AdamW state on the device, the probe's declaration, and a
gpu-role client training on CUDA for a real server on loopback. Skipped where there is no CUDA
device (CI has none); README's Development section says how they were run on a GPU machine."""

import copy

import pytest
import torch

from federation_procs import running_server, stdlib_folders
from hf_models import save_tiny
from stamen.core.data import stdlib_corpus
from stamen.core.lora import LoraPlan, lora_space
from stamen.core.model import GPT, PRESETS, ModelSpec, load_weights
from stamen.core.plan import full_plan
from stamen.core.train import TrainConfig, evaluate, train_steps
from stamen.edge_client.client import EdgeClient, declared_runtimes
from stamen.edge_client.probe import capabilities, measure_flops, probe
from stamen.edge_client.runtime import TorchRuntime
from stamen.server.auth import create_token

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CFG = PRESETS["gpt-tiny"]
TC = TrainConfig(lr=3e-3, warmup_steps=5, total_steps=100)


def test_bf16_training_on_cuda_follows_fp32_on_the_cpu():
    """The same 40 steps from the same weights on the same batches: bf16 rounds each product's
    inputs to 8 significant bits, so the losses differ by rounding, not by a bug (a wrong
    schedule, a lost gradient or a cast that sticks would move them by far more than 2%)."""
    torch.manual_seed(0)
    cpu = GPT(CFG)
    gpu = copy.deepcopy(cpu).to("cuda")
    shard, held_out = stdlib_corpus().split()
    a = train_steps(cpu, shard.batches(8, 64, seed=0), 40, TC)
    b = train_steps(gpu, shard.batches(8, 64, seed=0), 40, TC)
    assert all(p.is_cuda and p.dtype == torch.float32 for p in gpu.parameters())  # master weights stay fp32
    assert b.losses[-1] < b.losses[0] - 1.0, b.losses  # it learnt
    gaps = [abs(x - y) / x for x, y in zip(a.losses, b.losses)]
    assert max(gaps) < 0.02, gaps
    val = held_out.fixed_batches(4, 8, 64)
    back = GPT(CFG)
    load_weights(back, {n: p.detach().cpu() for n, p in gpu.named_parameters()})
    on_gpu, on_cpu = evaluate(gpu, val), evaluate(back, val)  # the same weights scored in bf16 and in fp32
    assert abs(on_gpu - on_cpu) / on_cpu < 0.01, (on_gpu, on_cpu)
    assert abs(on_cpu - evaluate(cpu, val)) / on_cpu < 0.02


def test_a_gpu_node_is_deterministic_for_a_seed():
    def run() -> list[float]:
        torch.manual_seed(1)
        model = GPT(CFG).to("cuda")
        return train_steps(model, stdlib_corpus().split()[0].batches(8, 64, seed=3), 10, TC).losses

    assert run() == run()


def test_the_runtime_keeps_adamw_on_the_device_and_hands_back_cpu_fp32(tmp_path):
    """A GPU node's TorchRuntime: the weights it returns are CPU fp32 (what the codecs take);
    its AdamW moments live on the device, survive from task to task, and a saved optimizer
    resumes in a fresh runtime (a Flower SuperNode's next process) to the same losses."""
    plan = full_plan(CFG)
    torch.manual_seed(0)
    glob = {n: p.detach().clone() for n, p in GPT(CFG).named_parameters()}
    shard = stdlib_corpus().split()[0]
    kept = TorchRuntime(CFG, plan, "cuda", keep_optimizer=True)
    kept.set_weights(glob)
    first = kept.train(shard.batches(8, 64, seed=0), 5, TC)
    out = kept.trained_weights()
    assert sorted(out) == sorted(glob)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in out.values())
    assert any(not torch.equal(out[n], glob[n]) for n in glob)
    moments = [s["exp_avg"] for s in kept.optimizer.state.values()]
    assert moments and all(m.is_cuda for m in moments)
    kept.save_optimizer(tmp_path / "opt.pt")
    fresh = TorchRuntime(CFG, plan, "cuda", keep_optimizer=True)
    assert fresh.load_optimizer(tmp_path / "opt.pt", TC)
    for rt in (kept, fresh):
        rt.set_weights(out)
    a = kept.train(shard.batches(8, 64, seed=1), 5, TC, step_offset=5)
    b = fresh.train(shard.batches(8, 64, seed=1), 5, TC, step_offset=5)
    assert a.losses == b.losses
    assert a.losses[-1] < first.losses[0]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_lora_gpu_node_trains_an_adapter_over_a_bf16_base_on_cuda(kind, tmp_path):
    """Federated fine-tuning's GPU node: the base held in bf16 on the card, the adapter's
    weights fp32; the same steps as over the fp32 base on the CPU, to within bf16's rounding,
    and only the adapter moves."""
    spec = ModelSpec(f"hf:{save_tiny(kind, tmp_path / kind)}")
    space = lora_space(spec.build(weights=False), r_max=8)
    text = stdlib_corpus().split()[0]
    runs = {}
    for device, plan in (("cpu", LoraPlan("fp32", 8)), ("cuda", LoraPlan("bf16", 8, base="bf16"))):
        rt = TorchRuntime(space, plan, device, base=spec.build())
        rt.set_weights(plan.extract(space.init(0), space))
        frozen = {n: p.detach().clone() for n, p in rt.model.named_parameters() if not p.requires_grad}
        runs[device] = rt.train(text.batches(4, 32, seed=0), 10, TC).losses, rt.trained_weights()
        assert all(torch.equal(p, frozen[n]) for n, p in rt.model.named_parameters() if n in frozen)
    gpu = [p for p in rt.model.parameters() if not p.requires_grad]
    assert gpu and all(p.is_cuda and p.dtype == torch.bfloat16 for p in gpu)
    (cpu_losses, cpu_out), (gpu_losses, gpu_out) = runs["cpu"], runs["cuda"]
    assert gpu_losses[-1] < gpu_losses[0], gpu_losses
    gaps = [abs(x - y) / x for x, y in zip(cpu_losses, gpu_losses)]
    assert max(gaps) < 0.02, gaps
    assert sorted(gpu_out) == sorted(cpu_out)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in gpu_out.values())


def test_the_probe_declares_the_gpu():
    hw = probe()
    assert hw.cuda_device == torch.cuda.get_device_name(0)
    assert hw.cuda_memory == torch.cuda.get_device_properties(0).total_memory
    flops = measure_flops(torch.device("cuda"))
    caps = capabilities(hw, "gpu", declared_runtimes("auto", "gpu", True), flops)
    assert caps.device_class == "gpu" and caps.accelerator == f"cuda:{hw.cuda_device}"
    assert caps.memory_bytes == hw.cuda_memory and caps.runtimes[0] == "torch"
    assert flops > 0


FED = """
[aggregation]
buffer_k = 1
[training]
seq_len = 64
warmup_steps = 5
total_steps = 200
[tiers.gpu]
steps = 20
batch_size = 8
"""


@pytest.mark.timeout(300)
def test_a_gpu_role_client_trains_on_cuda_for_a_real_server(tmp_path):
    """``stamen client --role gpu`` on a CUDA machine: it declares torch first, trains the full
    model on the device (memory was allocated there), and its updates are accepted, each a
    version; the second task starts from the first one's version and its loss is lower."""
    data = stdlib_folders(tmp_path, [["json", "email", "logging"]])[0]
    torch.cuda.reset_peak_memory_stats()
    with running_server(tmp_path, FED) as (url, state):
        log = EdgeClient(url, create_token(state, "gpu"), str(data), role="gpu", state_dir=tmp_path / "node",
                         max_tasks=2, progress=False).run()
    assert [t.outcome for t in log] == ["accepted", "accepted"]
    assert [t.tier for t in log] == ["gpu", "gpu"] and [t.runtime for t in log] == ["torch", "torch"]
    assert [t.version for t in log] == [1, 2] and log[1].base_version == 1
    assert log[1].mean_loss < log[0].mean_loss, [(t.first_loss, t.last_loss) for t in log]
    assert torch.cuda.max_memory_allocated() > 0
