"""What this machine can train with: memory, cores, a CUDA device, a Jetson board, and a
measured matmul rate. The client declares the result as ``Capabilities`` so the server's
planner can choose a submodel and a step count that fit, instead of trusting a label."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from stamen.core.errors import UserError
from stamen.core.records import Capabilities
from stamen.core.train import compute_dtype

# Share of free memory training may use when the owner sets no limit: the OS, the app and
# the data stream need the rest.
DEFAULT_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Hardware:
    available_memory: int  # bytes of RAM free now
    total_memory: int
    cores: int
    cuda_device: str  # "" without CUDA
    cuda_memory: int  # bytes on CUDA device 0
    jetson: str  # board model or L4T release line, "" elsewhere


def jetson_board(root: Path = Path("/")) -> str:
    """A Jetson is recognised by its device-tree model (``NVIDIA Jetson ...``) or, failing
    that, by the L4T release file every JetPack image carries."""
    model = root / "proc/device-tree/model"
    if model.is_file():
        name = model.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
        if "jetson" in name.lower():
            return name
    release = root / "etc/nv_tegra_release"
    if release.is_file():
        return release.read_text(errors="replace").splitlines()[0].lstrip("# ").strip()
    return ""


def probe(root: Path = Path("/")) -> Hardware:
    mem = psutil.virtual_memory()
    cuda_device, cuda_memory = "", 0
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cuda_device, cuda_memory = props.name, int(props.total_memory)
    return Hardware(int(mem.available), int(mem.total), psutil.cpu_count(logical=False) or 1,
                    cuda_device, cuda_memory, jetson_board(root))


def measure_flops(device: torch.device, seconds: float = 0.2) -> float:
    """Sustained matmul FLOP/s over about ``seconds`` in the precision training computes in
    (``core.train.compute_dtype``): 512 x 512 products on a CPU, 4096 x 4096 ones on CUDA.
    The scheduler cuts a task's steps to what this rate fits in a share of its deadline
    (``Scheduler.steps_for``), so a rate that undersells the machine cuts a GPU node's work: on
    an H200 fp32 512 x 512 products (launch-bound, and not training's precision) gave 15-16
    TFLOP/s, bf16 4096 x 4096 ones 640-704, and bf16 training of gpt-125m and gpt-350m runs at
    300-385 (``bench/gpu_node.py``): about half the matmul rate, as on a CPU, which the
    scheduler's ``compute_share`` allows for."""
    size, dtype = 4096 if device.type == "cuda" else 512, compute_dtype(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, allocator
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - start)


def capabilities(hw: Hardware, role: str, runtimes: tuple[str, ...], flops: float,
                 max_memory: int | None = None) -> Capabilities:
    """The declaration sent at join. GPU nodes offer their device memory; others a share of
    free RAM (a gpu-role node without CUDA, as in tests, too); ``max_memory`` (the owner's cap) always wins when smaller."""
    if role not in ("device", "gpu"):
        raise UserError(f"unknown role {role!r}: use device or gpu")
    on_gpu = role == "gpu" and hw.cuda_device
    memory = hw.cuda_memory if on_gpu else int(hw.available_memory * DEFAULT_MEMORY_SHARE)
    if max_memory is not None:
        if max_memory <= 0:
            raise UserError(f"--max-memory must be positive, got {max_memory}")
        memory = min(memory, max_memory)
    accel = f"cuda:{hw.cuda_device}" if hw.cuda_device else (f"jetson:{hw.jetson}" if hw.jetson else "")
    return Capabilities(role=role, memory_bytes=memory, flops=flops, runtimes=runtimes,
                        cores=hw.cores, accelerator=accel, device_class=device_class(hw, role))


def device_class(hw: Hardware, role: str) -> str:
    """The hardware class the scheduler caps the tier by, where the probe can tell: a Jetson
    board is a jetson, a CUDA box in the gpu role a gpu node; any other machine running this
    Python client is a laptop-class computer (phones run native apps, not this client)."""
    if role == "gpu" and hw.cuda_device:
        return "gpu"
    return "jetson" if hw.jetson else "laptop"
