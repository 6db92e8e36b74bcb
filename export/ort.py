"""Plan submodel -> ONNX Runtime Training artifacts (training, eval and optimizer models and a
checkpoint), the format ORT's on-device training API (Android/iOS/C/C++) loads.

Pinned by what runs here: onnxruntime-training 1.19.2 reads ONNX IR <= 10, and its gradient
builder needs LayerNormalization's training outputs, which only the legacy exporter at opset
16 in TRAINING mode emits. The batch and sequence dimensions stay dynamic, so one export
serves every task shape."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from stamen.export.common import Exported, ParamSlot, canonical_names, input_specs, loss_module, travelling

OPSET = 16
FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


def export_ort(model: nn.Module, out_dir: Path) -> Exported:
    """Write the ORT training artifacts of ``model`` (tensors with requires_grad=False stay
    frozen) into ``out_dir``. The optimizer model is ORT's SGD: stamen's runtimes run the
    optimizer themselves (see mobile_bridge.loop) but a native app can use it as is."""
    from onnxruntime.training import artifacts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    dynamic = {"idx": {0: "batch", 1: "seq"}, "targets": {0: "batch", 1: "seq"}}
    onnx_path = out_dir / "model.onnx"
    torch.onnx.export(loss_module(model), example, str(onnx_path), input_names=["idx", "targets"],
                      output_names=["loss"], opset_version=OPSET, dynamo=False,
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                      dynamic_axes=dynamic)
    proto = onnx.load(str(onnx_path))
    onnx_path.unlink()
    aliases = canonical_names(model)
    params = dict(model.named_parameters())
    keys = [i.name for i in proto.graph.initializer]
    trainable = [k for k in keys if params[aliases[k]].requires_grad]
    frozen = [k for k in keys if k not in trainable]
    with _native_stderr_silenced():
        artifacts.generate_artifacts(proto, requires_grad=trainable, frozen_params=frozen, loss=None,
                                     optimizer=artifacts.OptimType.SGD, artifact_directory=str(out_dir))
    order = _parameter_order(out_dir / "training_model.onnx", keys)
    travel = travelling(model)  # a LoRA plan's frozen base stays in the checkpoint for good
    slots, offset = [], 0
    for key in order:
        p = params[aliases[key]]
        nbytes = p.numel() * p.element_size()
        if travel is None or aliases[key] in travel:
            slots.append(ParamSlot(aliases[key], key, tuple(p.shape), str(p.dtype).removeprefix("torch."),
                                   offset, nbytes, key in trainable))
        offset += nbytes
    return Exported("ort", FILES, input_specs("batch", "seq"), tuple(slots), "contiguous")


@contextmanager
def _native_stderr_silenced():
    """ORT's gradient builder logs every graph pass at INFO from C++, through session options
    ``generate_artifacts`` does not let us set (``set_default_logger_severity`` does not reach
    it). Failures still raise Python exceptions, so only the noise is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _parameter_order(training_model: Path, keys: list[str]) -> list[str]:
    """ORT lays parameters out in its contiguous buffer in the training graph's input order,
    not in the checkpoint's alphabetical order."""
    inputs = [i.name for i in onnx.load(str(training_model), load_external_data=False).graph.input]
    known = set(keys)
    return [n for n in inputs if n in known] + [k for k in keys if k not in set(inputs)]
