"""Plan submodel -> ExecuTorch training program: a ``.pte`` holding the joint forward/backward
graph and a ``.ptd`` holding every weight, so a new version only replaces the ``.ptd``.

ExecuTorch 1.5 specifics: the loss must be output 0 of the exported module; frozen tensors
are those with requires_grad=False; attention is traced with the MATH kernel because the
CPU flash-attention backward is not a core ATen op; shapes are static (one batch x seq per
program). With ``xnnpack`` the forward matmuls are delegated to XNNPACK, a tanh GELU written
out in ops first (``_tanh_gelu``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from stamen.export.common import (Exported, ParamSlot, canonical_names, input_specs, loss_module,
                                  make_weights_distinct, travelling)

PROGRAM, WEIGHTS = "program.pte", "weights.ptd"
# The export cache's name for an XNNPACK program (``mobile_bridge.bundle.cached_bundle``), renamed
# whenever what stamen hands XNNPACK changes, so that no cache serves an older program: those
# named "xnnpack" ran a tanh GELU as the erf one (``_tanh_gelu``).
XNNPACK_KEY = "xnnpack2"


def export_executorch(model: nn.Module, out_dir: Path, batch_size: int, seq_len: int,
                      xnnpack: bool = False) -> Exported:
    """Write ``program.pte`` and ``weights.ptd`` for ``model`` (its values are overwritten
    with distinct random numbers first, see ``make_weights_distinct``)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    travel = travelling(model)
    make_weights_distinct(model, travel)
    example = (torch.zeros(batch_size, seq_len, dtype=torch.long),
               torch.zeros(batch_size, seq_len, dtype=torch.long))
    with sdpa_kernel(SDPBackend.MATH):
        program = export(loss_module(model), example, strict=False)
        if xnnpack:
            program = program.run_decompositions({torch.ops.aten.gelu.default: _tanh_gelu})
        joint = _export_forward_backward(program)
    edge = to_edge(joint, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    if xnnpack:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        # Trained weights change every step: XNNPACK must read them as inputs, not pack them once.
        edge = edge.to_backend(XnnpackPartitioner(force_non_static_weights_for_f32_linear=True))
    program = edge.to_executorch(ExecutorchBackendConfig(external_constants=True))
    (out_dir / PROGRAM).write_bytes(program.buffer)
    program.write_tensor_data_to_file(str(out_dir))
    written = [p for p in out_dir.glob("*.ptd")]
    if len(written) != 1:
        raise RuntimeError(f"expected one .ptd from the ExecuTorch writer, found {written}")
    written[0].rename(out_dir / WEIGHTS)
    params = _ptd_layout(out_dir / WEIGHTS, model, travel)
    return Exported("executorch", (PROGRAM, WEIGHTS), input_specs(batch_size, seq_len), params, WEIGHTS)


def _tanh_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU's tanh form in ops XNNPACK runs as written (mul, add, tanh), the formula of torch's
    own kernel. ExecuTorch 1.5's XNNPACK lowering of ``aten.gelu`` ignores ``approximate`` and
    computes the exact erf GELU (pytorch/executorch#22851), up to 4.7e-4 away, while the
    backward, not delegated, differentiates the tanh form: the program's gradients were not its
    own loss's (tests/test_export_runtimes.py's AdamW parity). The erf form is left to XNNPACK."""
    if approximate != "tanh":
        return NotImplemented
    inner = math.sqrt(2 / math.pi) * (x + 0.044715 * (x * x * x))
    return 0.5 * x * (1 + torch.tanh(inner))


def _ptd_layout(path: Path, model: nn.Module, travel: set[str] | None) -> tuple[ParamSlot, ...]:
    """The byte range inside the ``.ptd`` file, read back from its own header, of every weight
    a new version overwrites (``travel``; None: all). Frozen weights that never travel (a LoRA
    plan's base) may share storage: nothing ever writes them."""
    from executorch.extension.flat_tensor.serialize.serialize import (FlatTensorHeader,
                                                                      _deserialize_to_flat_tensor)

    data = path.read_bytes()
    header = FlatTensorHeader.from_bytes(data[8:])
    flat = _deserialize_to_flat_tensor(data[: header.flatbuffer_offset + header.flatbuffer_size])
    aliases, params = canonical_names(model), dict(model.named_parameters())
    slots, seen = [], {}
    for entry in flat.named_data:
        seg = flat.segments[entry.segment_index]
        if travel is not None and aliases[entry.key] not in travel:
            continue
        if entry.segment_index in seen:
            raise RuntimeError(f"{entry.key} shares storage with {seen[entry.segment_index]}: weights must be distinct")
        seen[entry.segment_index] = entry.key
        p = params[aliases[entry.key]]
        if seg.size != p.numel() * p.element_size():
            raise RuntimeError(f"{entry.key}: {seg.size} bytes in the .ptd, {p.numel() * p.element_size()} expected")
        slots.append(ParamSlot(aliases[entry.key], entry.key, tuple(p.shape), str(p.dtype).removeprefix("torch."),
                               header.segment_base_offset + seg.offset, seg.size, p.requires_grad))
    want = set(params) if travel is None else travel
    if {s.name for s in slots} != want:
        raise RuntimeError(f"the .ptd misses weights: {sorted(want - {s.name for s in slots})[:3]}")
    return tuple(slots)
