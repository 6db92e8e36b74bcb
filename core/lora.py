"""LoRA plans: a frozen (possibly quantized) base and low-rank adapters, rank set per tier.

The federation's global model is the *adapter*, not the base: for every target linear layer W
(out × in) the ``LoraSpace`` holds A (r_max × in) and B (out × r_max), and a layer computes
W x + s · B A x. The base is frozen, so it never moves, never travels after the first download,
and never enters the aggregator. A ``LoraPlan`` of rank r ≤ r_max trains the prefix A[:r], B[:, r]
(HetLoRA's truncation): a rank slice is one dimension of each tensor, exactly the footprint a
width cut has on a GPT tensor, so the aggregator's coverage machinery averages each rank
component over the clients that trained it, and the plan reuses ``Plan``'s extract/scatter/
coverage code unchanged. The scale s is the same for every rank (``alpha / r_max``), so a rank-r
prefix is the global adapter truncated, not rescaled.

Two plan families (``train``): FedAvg of A and B (FlowerTune's), where the average of B_k A_k is
not the product of the averages; and ``exact`` (FFA-LoRA): A stays frozen at its seeded init on
every client, only B trains, so B A is linear in B and the averaged adapter's product is exactly
the average of the clients' products.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from stamen.core.errors import UserError
from stamen.core.plan import TIERS, Plan, PlanCost, Shapes, Slice

A, B = ".lora_A", ".lora_B"
TRAIN = {"fedavg": ("*" + A, "*" + B), "exact": ("*" + B,)}
BASES = {"fp32": 32, "bf16": 16, "int8": 8, "nf4": 4.127}  # bits per linear weight (nf4: QLoRA with double quant)
TRAINED_BASES = ("fp32", "bf16", "int8")  # those a runtime here trains over; nf4 only sizes plans (`stamen plans`)
# Rank (as a fraction of the global rank r_max) and base precision per tier: at r_max 16, phones
# train a rank-2 adapter over an 8-bit base and GPU nodes the whole rank-16 adapter over bf16.
TIER_LORA = {"phone-low": (1 / 8, "int8"), "phone-high": (1 / 4, "int8"), "laptop": (1 / 2, "int8"),
             "jetson": (1 / 2, "bf16"), "gpu": (1.0, "bf16")}
STAMEN_TARGETS = ("c_attn", "c_proj", "c_fc")  # every linear layer of a stamen GPT's blocks


@dataclass(frozen=True)
class BaseStats:
    """What the memory estimate needs to know about the frozen base."""

    params: int
    linear_params: int  # in the layers a quantized base stores in low precision (not embeddings, norms, head)
    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    vocab: int
    gated: bool  # SwiGLU-style MLP (three d_ff-wide tensors kept for backward instead of two)
    hf: bool  # a Hugging Face model (supports gradient checkpointing)


class LoraSpace(Mapping):
    """The global adapter's tensors, ``{name: shape}`` at rank r_max, and the base they adapt.
    A Mapping of shapes, so every function that takes a model's shapes takes it."""

    def __init__(self, targets: dict[str, tuple[int, int, bool]], r_max: int, alpha: float, base: BaseStats) -> None:
        if r_max < 1 or not targets:
            raise UserError("a LoRA space needs rank >= 1 and at least one target module")
        self.targets, self.r_max, self.alpha, self.base = dict(targets), r_max, float(alpha), base
        self.scaling = self.alpha / r_max
        self._shapes: Shapes = {}
        for m, (fan_in, fan_out, _) in self.targets.items():
            self._shapes[m + A] = (r_max, fan_in)
            self._shapes[m + B] = (fan_out, r_max)

    def __getitem__(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def describe(self) -> dict[str, Any]:
        """What a client needs to build this very space over its copy of the base (the join
        answer carries it; a state folder records it): exact module names, not patterns."""
        return {"rank": self.r_max, "alpha": self.alpha, "targets": list(self.targets)}

    @property
    def rank_dims(self) -> dict[str, int]:
        """The dimension a rank-r plan slices: A's rows, B's columns."""
        return {n: 0 if n.endswith(A) else 1 for n in self._shapes}

    def init(self, seed: int) -> dict[str, torch.Tensor]:
        """The starting adapter: A as ``nn.Linear`` initialises a weight (PEFT's choice,
        Kaiming-uniform with a = √5), B zero, so training starts from the base model exactly."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for n, shape in self._shapes.items():
            if n.endswith(A):
                bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=√5) on fan_in
                out[n] = (torch.rand(shape, generator=g) * 2 - 1) * bound
            else:
                out[n] = torch.zeros(shape)
        return out


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # transformers' GPT-2 layer


def _fans(m: nn.Module) -> tuple[int, int, bool]:
    """(in, out, stored transposed): Conv1D keeps its weight as (in, out)."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, False
    return m.weight.shape[0], m.weight.shape[1], True


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """PEFT's default target modules for a Hugging Face model type; every block linear of a GPT."""
    hf = getattr(model, "hf", None)
    if hf is None:
        return STAMEN_TARGETS
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    kind = hf.config.model_type
    if kind not in DEFAULTS:
        raise UserError(f"no default LoRA targets for model type {kind!r}: name them (e.g. --lora-targets q_proj,v_proj)")
    return tuple(DEFAULTS[kind])


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule (a module name equal to a target or ending in '.target'), plus fnmatch patterns."""
    return any(name == t or name.endswith("." + t) or fnmatch.fnmatchcase(name, t) for t in targets)


def base_stats(model: nn.Module) -> BaseStats:
    """Read off a (meta-device) model: a stamen GPT or a ``core.hf.CausalLM``."""
    params = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if _is_linear(m) and not n.endswith("lm_head"))
    hf = getattr(model, "hf", None)
    if hf is None:
        c = model.cfg
        return BaseStats(params, linear, c.n_layer, c.n_embd, c.mlp_hidden, c.n_head, c.vocab_size, False, False)
    c = hf.config.get_text_config()
    d = c.hidden_size
    d_ff = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
    gated = any(n.endswith("gate_proj") for n, _ in model.named_modules())
    return BaseStats(params, linear, c.num_hidden_layers, d, d_ff, c.num_attention_heads, c.vocab_size, gated, True)


def lora_space(model: nn.Module, r_max: int = 16, alpha: float | None = None,
               targets: tuple[str, ...] | None = None) -> LoraSpace:
    """The adapter space of ``model`` (which may live on the meta device). ``alpha`` defaults to
    2 · r_max (FlowerTune's r 32 / alpha 64), i.e. a scale of 2."""
    targets = default_targets(model) if targets is None else tuple(targets)
    found = {n: _fans(m) for n, m in model.named_modules() if _is_linear(m) and _matches(n, targets)}
    if not found:
        raise UserError(f"no linear module matches the LoRA targets {', '.join(targets)}")
    return LoraSpace(found, r_max, 2.0 * r_max if alpha is None else alpha, base_stats(model))


def described_space(model: nn.Module, described: dict[str, Any]) -> LoraSpace:
    """The space ``LoraSpace.describe()`` wrote, rebuilt over ``model`` (a client's copy of the
    base, or its meta-device architecture); refused if the base does not have those modules."""
    try:
        rank, alpha, targets = int(described["rank"]), float(described["alpha"]), tuple(described["targets"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"bad LoRA description {described!r:.200}: {e}") from None
    space = lora_space(model, rank, alpha, targets)
    if sorted(space.targets) != sorted(targets):
        raise UserError("this base does not have the modules the federation adapts: is it the server's base?")
    return space


class LoraLinear(nn.Module):
    """A frozen linear layer plus a rank-r adapter: y = base(x) + s · (x Aᵀ) Bᵀ. The adapter
    computes in its own dtype (fp32) whatever the base's (bf16, int8)."""

    def __init__(self, base_layer: nn.Module, rank: int, scaling: float) -> None:
        super().__init__()
        fan_in, fan_out, self.transposed = _fans(base_layer)
        self.base_layer, self.scaling = base_layer, scaling
        self.lora_A = nn.Parameter(torch.zeros(rank, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return self.base_layer(x) + (self.scaling * low).to(x.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with s · B A folded into its weight (the layer is changed in place)."""
        delta = self.scaling * (self.lora_B @ self.lora_A)
        w = self.base_layer.weight
        w.add_((delta.T if self.transposed else delta).to(w.dtype))
        return self.base_layer


def _conv1d_as_linear(model: nn.Module) -> None:
    """Replace GPT-2's Conv1D layers (y = x W + b, W stored (in, out)) by the ``nn.Linear`` each
    equals (W transposed), in place: torchao quantizes Linears only, and a GPT-2 base left in
    fp32 under an int8 plan would hold four times the memory its plan was sized for."""
    for name, m in list(model.named_modules()):
        if not _is_linear(m):
            continue
        fan_in, fan_out, transposed = _fans(m)
        if transposed:
            linear = nn.Linear(fan_in, fan_out, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(m.weight.T)
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            _set_module(model, name, linear.requires_grad_(False))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@dataclass(frozen=True)
class LoraPlan:
    """Train a rank-``rank`` prefix of the global adapter over a frozen base held at ``base``
    precision. ``train`` names the adapter tensors that train (``TRAIN["fedavg"]`` or
    ``TRAIN["exact"]``); ``checkpointing`` recomputes each block in backward (Hugging Face
    bases only)."""

    name: str
    rank: int
    base: str = "fp32"
    train: tuple[str, ...] = TRAIN["fedavg"]
    checkpointing: bool = False

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes a server issues this plan for (``core.wire.RUNTIMES`` names): over an
        fp32 base also ExecuTorch, whose bundle carries the base (a quantized or bf16 base is
        torch's alone). Not ORT: a Hugging Face base's mask code uses ``aten::diff``, which
        the opset-16 training exporter cannot express (a stamen GPT base does export to ORT,
        ``mobile_bridge.bundle.write_bundle``)."""
        return ("torch", "executorch") if self.base == "fp32" else ("torch",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", tuple(self.train))
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise UserError(f"plan {self.name!r}: LoRA rank must be a positive integer, got {self.rank!r}")
        if self.base not in BASES:
            raise UserError(f"plan {self.name!r}: base precision must be one of {', '.join(BASES)}, got {self.base!r}")

    # --- identity ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": "lora", "name": self.name, "rank": self.rank, "base": self.base, "train": list(self.train),
                "checkpointing": self.checkpointing}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraPlan":
        keys = {"kind", "name", "rank", "base", "train", "checkpointing"}
        if not isinstance(d, dict) or set(d) != keys:
            raise UserError(f"a LoRA plan needs exactly the keys {', '.join(sorted(keys))}; got {d!r:.200}")
        train, ckpt = d["train"], d["checkpointing"]
        if not isinstance(train, list) or not all(isinstance(p, str) and p for p in train) or not train:
            raise UserError(f"bad LoRA plan {d!r:.200}: train must be a list of name patterns")
        if not isinstance(ckpt, bool):
            raise UserError(f"bad LoRA plan {d!r:.200}: checkpointing must be true or false")
        return cls(str(d["name"]), d["rank"], str(d["base"]), tuple(train), ckpt)

    to_json = Plan.to_json

    @property
    def hash(self) -> str:
        ident = {k: v for k, v in self.to_dict().items() if k != "name"}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    # --- footprint on the global adapter (the methods Plan's extract/scatter/coverage read) ---
    def _check(self, space: LoraSpace) -> None:
        if self.rank > space.r_max:
            raise UserError(f"plan {self.name!r} has rank {self.rank} but the global adapter only {space.r_max}")

    def shapes(self, space: LoraSpace) -> Shapes:
        self._check(space)
        return {n: (self.rank, s[1]) if n.endswith(A) else (s[0], self.rank) for n, s in space.items()}

    def slices(self, space: LoraSpace) -> dict[str, Slice]:
        self._check(space)
        if self.rank == space.r_max:
            return {n: None for n in space}
        return {n: (d, torch.arange(self.rank)) for n, d in space.rank_dims.items()}

    def trainable(self, space: LoraSpace) -> list[str]:
        return [n for n in self.shapes(space) if any(fnmatch.fnmatchcase(n, p) for p in self.train)]

    index, extract, scatter, coverage = Plan.index, Plan.extract, Plan.scatter, Plan.coverage

    # --- the module ---------------------------------------------------------------------------
    def build(self, model: nn.Module, space: LoraSpace) -> nn.Module:
        """Turn ``model`` (the base, changed in place) into this plan's trainable model: freeze
        it, hold its linear weights at the plan's precision, and put a rank-r adapter on every
        target. Load ``extract()`` into the adapter (``load_adapter``)."""
        self._check(space)
        model.requires_grad_(False)
        if self.base == "bf16":
            model.to(torch.bfloat16)
        elif self.base == "int8":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            _conv1d_as_linear(model)
            quantize_(model, Int8WeightOnlyConfig(),
                      filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not fqn.endswith("lm_head"))
        elif self.base == "nf4":
            raise UserError("a 4-bit (nf4) base is for planning only (`stamen plans --base nf4`): no runtime "
                            "here trains over one; use int8 (torchao) or bf16")
        for name in space.targets:
            _set_module(model, name, LoraLinear(model.get_submodule(name), self.rank, space.scaling))
        trainable = set(self.trainable(space))
        for n, p in adapter_params(model).items():
            p.requires_grad_(n in trainable)
        if self.checkpointing and hasattr(model, "hf"):
            model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def cost(self, space: LoraSpace, batch_size: int, seq_len: int) -> PlanCost:
        """Training memory and FLOPs. Memory: the base's linear weights at the plan's bits
        (embeddings, norms and head at its compute dtype: fp32, or bf16 for bf16/nf4 bases,
        since bitsandbytes computes in bf16 and torchao's int8 weight-only in the activations'
        fp32); the adapter in fp32 with grads and two AdamW moments where it trains; and the
        activations backward keeps, per token and block: the residual and LayerNorm streams
        (7 d: two LN inputs and outputs, attention output, and q|k|v), the attention
        probabilities (heads · T) and the MLP's hidden tensors (2 d_ff, 3 for a gated MLP), at
        the compute dtype; plus, per vocabulary entry, the logits at the compute dtype, their
        fp32 copy (bf16 only), the loss's fp32 log-softmax and the logits' fp32 gradient. With
        checkpointing, only each block's input is kept, plus one block's activations. Not
        modelled: the CUDA context and allocator slack, transient dequantized weights.
        FLOPs: forward and input-gradient matmuls through the whole frozen base (4 per
        weight), weight gradients for the trainable adapter only (2 more), a recomputed
        forward under checkpointing (2 more), attention's 12·L·d·T."""
        b = space.base
        shapes, trainable = self.shapes(space), set(self.trainable(space))
        adapter = sum(math.prod(s) for s in shapes.values())
        n_train = sum(math.prod(shapes[n]) for n in trainable)
        half = self.base in ("bf16", "nf4")
        act = 2 if half else 4
        base_bytes = b.linear_params * BASES[self.base] / 8 + (b.params - b.linear_params) * act
        per_block = 7 * b.d_model + b.n_head * seq_len + (3 if b.gated else 2) * b.d_ff
        per_block += self.rank * len(space.targets) // max(1, b.n_layer)
        kept = (b.n_layer * b.d_model + per_block) if self.checkpointing else b.n_layer * per_block
        tokens = batch_size * seq_len
        activations = tokens * (kept * act + (14 if half else 12) * b.vocab)
        memory = base_bytes + 4 * adapter + 12 * n_train + activations
        flops = (4.0 + 2.0 * self.checkpointing) * b.params + 6.0 * n_train + 12.0 * b.n_layer * b.d_model * seq_len
        return PlanCost(b.params + adapter, n_train, int(memory), flops)


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters of a built model, by global adapter name."""
    return {n: p for n, p in model.named_parameters() if n.endswith((A, B))}


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in adapter_params(model).items()}


@torch.no_grad()
def load_adapter(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy a plan's adapter (``LoraPlan.extract``) into a built model, in place."""
    params = adapter_params(model)
    if set(params) != set(values):
        raise KeyError(f"adapter does not match the model: {sorted(set(params) ^ set(values))[:3]}")
    for n, p in params.items():
        p.copy_(values[n])


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop the adapter modules, in place: the
    result is the base architecture again (fp32 or bf16 bases only)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLinear):
            if not m.base_layer.weight.is_floating_point() or type(m.base_layer.weight) is not nn.Parameter:
                raise UserError("cannot merge into a quantized base: rebuild the plan with an fp32 or bf16 base")
            _set_module(model, name, m.merged())
    return model


def tier_lora_plans(space: LoraSpace, rule: str = "fedavg", base: str | None = None) -> dict[str, LoraPlan]:
    """The default tier table of LoRA plans (``TIER_LORA``'s share of r_max, at least 1). ``base``
    overrides every tier's precision; GPU nodes on a Hugging Face base checkpoint their blocks."""
    if rule not in TRAIN:
        raise UserError(f"unknown LoRA rule {rule!r}: use {' or '.join(TRAIN)}")
    return {tier: LoraPlan(f"lora-{tier}", max(1, round(share * space.r_max)), base or tier_base, TRAIN[rule],
                           checkpointing=tier == "gpu" and space.base.hf)
            for tier, (share, tier_base) in TIER_LORA.items() if tier in TIERS}


def lora_plans_table(space: LoraSpace, batch_size: int, seq_len: int, rule: str = "fedavg",
                     base: str | None = None) -> list[dict[str, Any]]:
    """Rows for ``stamen plans --lora``: each tier's LoRA plan and its cost."""
    rows = []
    for tier, plan in tier_lora_plans(space, rule, base).items():
        c = plan.cost(space, batch_size, seq_len)
        rows.append({"tier": tier, "plan": plan.hash, "rank": plan.rank, "base": plan.base,
                     "checkpointing": plan.checkpointing, "params": c.params, "trainable": c.trainable_params,
                     "memory_mb": round(c.memory_bytes / 2**20, 1), "flops_per_token": c.flops_per_token})
    return rows
