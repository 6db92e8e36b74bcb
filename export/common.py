"""What every exporter does to a submodel before handing it to a runtime's tool chain."""

from __future__ import annotations

import copy
import types
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


def loss_module(model: nn.Module) -> nn.Module:
    """A shallow copy of a stamen GPT (or a ``core.hf.CausalLM``, a LoRA plan's Hugging Face
    base) whose forward returns only the training loss.

    Both tool chains want the loss as the (first) output. A shallow copy shares the
    parameters, so the exported tensor names stay the global names (``blocks.3.mlp...``)
    instead of gaining a wrapper prefix, and the caller's model is left untouched.

    A tied head is replaced by one that reads ``wte.weight`` without registering it again:
    ``torch.export`` would otherwise lift the tensor twice (``wte.weight`` and
    ``lm_head.weight``) and give the second name no gradient."""
    out = copy.copy(model)
    out._modules = dict(model._modules)
    if hasattr(model, "lm_head") and model.lm_head.weight is model.wte.weight:
        out.lm_head = _TiedHead(model.wte)
    full_forward = type(model).forward
    out.forward = types.MethodType(lambda self, idx, targets: full_forward(self, idx, targets)[1], out)
    return out


class _TiedHead(nn.Module):
    def __init__(self, wte: nn.Embedding) -> None:
        super().__init__()
        self.__dict__["wte"] = wte  # not a submodule: the tensor keeps its one name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wte.weight)


@torch.no_grad()
def make_weights_distinct(model: nn.Module, names: Collection[str] | None = None, seed: int = 0) -> None:
    """Fill the parameters named ``names`` (None: every one) with seeded random values, in place.

    The program's travelling weights are replaced by every version's weights at run time, so
    the values exported do not matter -- but the ExecuTorch data writer stores identical
    tensors once (fresh LayerNorms are all ones, biases all zeros, a LoRA B all zeros), and a
    shared slot cannot later hold two different tensors. A LoRA plan's frozen base is not
    among ``names``: it keeps its pretrained values, which the bundle carries."""
    gen = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if names is None or n in names:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def travelling(model: nn.Module) -> set[str] | None:
    """The parameters a new version overwrites: a LoRA model's adapter (its base is frozen for
    good and baked into the bundle), or None for a submodel, all of whose tensors travel."""
    names = {n for n in canonical_names(model).values() if n.endswith((".lora_A", ".lora_B"))}
    return names or None


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name a parameter goes by (``lm_head.weight`` when tied) -> its canonical name
    (the one ``named_parameters`` gives, ``wte.weight``): runtimes may pick either alias."""
    canon: dict[int, str] = {id(p): n for n, p in model.named_parameters()}
    return {n: canon[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}


@dataclass(frozen=True)
class ParamSlot:
    """Where one submodel tensor lives in a runtime's own storage.

    ``key`` is the runtime's name for it (an alias of ``name`` for tied weights), ``offset``
    and ``nbytes`` locate it in ``Exported.layout_of`` -- a byte range a native app can
    overwrite with a new version's weights without understanding the file format."""

    name: str
    key: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int
    trainable: bool


@dataclass(frozen=True)
class Exported:
    """What an exporter wrote into its folder."""

    runtime: str
    files: tuple[str, ...]  # file names inside the folder
    inputs: tuple[dict, ...]  # {"name", "dtype", "shape"}; a str dimension is dynamic
    params: tuple[ParamSlot, ...]  # in the runtime's own order
    layout_of: str  # what the offsets index: a file name, or "contiguous" (ORT's parameter buffer)


def input_specs(batch: int | str, seq: int | str) -> tuple[dict, ...]:
    return tuple({"name": n, "dtype": "int64", "shape": [batch, seq]} for n in ("idx", "targets"))
