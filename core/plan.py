"""Plans: the submodels that unequal devices train.

A ``Plan`` keeps some of the global model's transformer blocks (the others are skipped; the
residual stream carries on without them), a width fraction (a prefix of the attention heads and
of the MLP hidden units in every kept block, FjORD / HeteroFL style), and a set of fnmatch
patterns naming which kept tensors train (the rest are frozen). Because a submodel built by
``GPT(cfg, block_ids, n_head, mlp_hidden)`` keeps global tensor names, a plan can say exactly
which *elements* of each global tensor it covers — which is what the aggregator averages over.

Every width cut slices a tensor along at most one dimension (rows of c_attn as three q|k|v
ranges, rows of c_fc, columns of the two c_proj), so a plan's footprint on one tensor is a
``(dim, positions)`` pair. ``slices()`` exposes it; ``index()`` turns it into an indexer.

A user module that is not a GPT has only the full plan: there the methods take the module's
global tensor shapes (``{name: shape}``) in place of a GPTConfig.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from stamen.core.errors import UserError
from stamen.core.model import GPT, GPTConfig, ModelSpec
from stamen.core.wire import RUNTIMES

Shapes = dict[str, tuple[int, ...]]
Model = GPTConfig | Shapes  # a GPT's config, or a user module's global tensor shapes
Slice = tuple[int, torch.Tensor] | None  # (sliced dim, kept positions) or None for the whole tensor

TIERS = ("phone-low", "phone-high", "laptop", "jetson", "gpu")
WIDTHS = (0.25, 0.5, 0.75, 1.0)
BODY = ("blocks.*", "ln_f.*")  # everything but the embeddings (which dominate memory at 50k vocab)


@functools.lru_cache(maxsize=256)
def _shapes(cfg: GPTConfig, blocks: tuple[int, ...] | None, n_head: int, mlp_hidden: int) -> Shapes:
    """Tensor names and shapes of a (sub)model, read off a GPT built on the meta device: exact
    by construction and free of memory."""
    with torch.device("meta"):
        model = GPT(cfg, blocks, n_head, mlp_hidden)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def global_shapes(cfg: Model) -> Shapes:
    """The global model's tensor names (canonical ``weights()`` order) and shapes."""
    if isinstance(cfg, GPTConfig):
        return _shapes(cfg, None, cfg.n_head, cfg.mlp_hidden)
    return dict(cfg)


@dataclass(frozen=True)
class PlanCost:
    params: int  # parameters the submodel holds
    trainable_params: int
    memory_bytes: int  # fp32 weights + grads + AdamW moments + activations at batch x seq
    flops_per_token: float  # one training step (forward + backward), per token


@dataclass(frozen=True)
class Plan:
    name: str  # a label; a plan's identity is the fields below
    blocks: tuple[int, ...]  # kept global block indices, ascending
    width: float = 1.0  # fraction of heads and MLP hidden units kept (prefixes)
    train: tuple[str, ...] = ("*",)  # fnmatch patterns over global tensor names that train

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        object.__setattr__(self, "train", tuple(self.train))
        object.__setattr__(self, "width", float(self.width))
        if list(self.blocks) != sorted(set(self.blocks)) or any(b < 0 for b in self.blocks):
            raise UserError(f"plan {self.name!r}: blocks must be distinct, ascending and >= 0, got {self.blocks}")
        if not 0.0 < self.width <= 1.0:
            raise UserError(f"plan {self.name!r}: width must be in (0, 1], got {self.width}")
        if not self.train or not all(isinstance(p, str) and p for p in self.train):
            raise UserError(f"plan {self.name!r}: train needs at least one non-empty pattern")

    runtimes = RUNTIMES  # every runtime trains a submodel

    # --- identity -------------------------------------------------------------------------
    @functools.cached_property
    def hash(self) -> str:  # computed once per plan: the server reads it several times per update
        ident = {"blocks": list(self.blocks), "width": self.width, "train": list(self.train)}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "blocks": list(self.blocks), "width": self.width, "train": list(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """A plan of either kind from its record: a submodel (no ``kind`` key, the original
        record, so existing ledgers, journals and devices read unchanged) or ``kind: "lora"``
        (``core.lora.LoraPlan``). Every reader (ledger, journal, bundles, the client) goes
        through here, so LoRA is one more plan kind, not a parallel path."""
        if isinstance(d, dict) and d.get("kind") == "lora":
            from stamen.core.lora import LoraPlan  # lora builds on this module

            return LoraPlan.from_dict(d)
        if not isinstance(d, dict) or set(d) != {"name", "blocks", "width", "train"}:
            raise UserError(f"a plan needs exactly the keys name, blocks, width, train; got {d!r:.200}")
        try:
            return cls(str(d["name"]), tuple(d["blocks"]), float(d["width"]), tuple(d["train"]))
        except (TypeError, ValueError) as e:
            raise UserError(f"bad plan {d!r:.200}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(s))
        except json.JSONDecodeError as e:
            raise UserError(f"plan is not JSON: {e}") from None

    # --- shape ----------------------------------------------------------------------------
    def n_head(self, cfg: GPTConfig) -> int:
        return max(1, int(self.width * cfg.n_head + 0.5))

    def mlp_hidden(self, cfg: GPTConfig) -> int:
        return max(1, int(self.width * cfg.mlp_hidden + 0.5))

    def _check(self, cfg: Model) -> None:
        if isinstance(cfg, GPTConfig):
            if self.blocks and self.blocks[-1] >= cfg.n_layer:
                raise UserError(f"plan {self.name!r} keeps block {self.blocks[-1]} but the model has {cfg.n_layer}")
        elif self.blocks or self.width != 1.0:
            raise UserError(f"plan {self.name!r}: a non-GPT model has only the full plan (no blocks, width 1)")

    def shapes(self, cfg: Model) -> Shapes:
        """The submodel's tensor names (global names) and shapes."""
        self._check(cfg)
        if isinstance(cfg, GPTConfig):
            return _shapes(cfg, self.blocks, self.n_head(cfg), self.mlp_hidden(cfg))
        return dict(cfg)

    def build(self, cfg: GPTConfig) -> GPT:
        """A real, smaller module; tensors outside ``train`` have requires_grad=False. Its
        weights are freshly initialised: load ``extract()`` into it."""
        self._check(cfg)
        model = GPT(cfg, self.blocks, self.n_head(cfg), self.mlp_hidden(cfg))
        trainable = set(self.trainable(cfg))
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        return model

    def slices(self, cfg: Model) -> dict[str, Slice]:
        """Per kept global tensor: None if kept whole, else (dim, kept positions along dim)."""
        full, sub = global_shapes(cfg), self.shapes(cfg)
        out: dict[str, Slice] = {}
        for name, shape in sub.items():
            dims = [d for d, (s, g) in enumerate(zip(shape, full[name])) if s != g]
            if not dims:
                out[name] = None
                continue
            (dim,) = dims  # a width cut slices one dimension only
            if name.endswith(("c_attn.weight", "c_attn.bias")):  # rows are q|k|v: a prefix of each third
                third, kept = full[name][0] // 3, shape[0] // 3
                pos = torch.cat([torch.arange(kept) + i * third for i in range(3)])
            else:
                pos = torch.arange(shape[dim])
            out[name] = (dim, pos)
        return out

    def index(self, cfg: Model) -> dict[str, tuple]:
        """Per kept global tensor: an indexer ``g[ix]`` selecting the covered elements (a view
        for prefixes; an index tensor for c_attn's three ranges)."""
        out: dict[str, tuple] = {}
        for name, sl in self.slices(cfg).items():
            if sl is None:
                out[name] = ()
                continue
            dim, pos = sl
            contiguous = bool(torch.equal(pos, torch.arange(len(pos))))
            out[name] = (slice(None),) * dim + (slice(0, len(pos)) if contiguous else pos,)
        return out

    def trainable(self, cfg: Model) -> list[str]:
        """Global names of the kept tensors that train."""
        return [n for n in self.shapes(cfg) if any(fnmatch.fnmatchcase(n, p) for p in self.train)]

    def extract(self, global_weights: dict[str, torch.Tensor], cfg: Model) -> dict[str, torch.Tensor]:
        """The submodel's weights (every kept tensor), as fresh contiguous copies."""
        return {n: global_weights[n][ix].clone(memory_format=torch.contiguous_format)
                for n, ix in self.index(cfg).items()}

    def scatter(self, global_weights: dict[str, torch.Tensor], sub: dict[str, torch.Tensor], cfg: Model) -> None:
        """Write sub-tensors back into the global tensors, in place."""
        index = self.index(cfg)
        with torch.no_grad():
            for n, t in sub.items():
                global_weights[n][index[n]] = t

    def coverage(self, cfg: Model) -> dict[str, torch.Tensor]:
        """Boolean masks over the global tensors: the elements this plan trains."""
        full, index = global_shapes(cfg), self.index(cfg)
        masks = {}
        for n in self.trainable(cfg):
            m = torch.zeros(full[n], dtype=torch.bool)
            m[index[n]] = True
            masks[n] = m
        return masks

    def cost(self, cfg: Model, batch_size: int, seq_len: int) -> PlanCost:
        """Training cost estimate: what one step (forward + backward) of this plan computes and
        holds, for the planner's fits (``server/scheduler.py``) and the simulator's virtual
        compute time (``simulator/engine.py``).

        Backward runs only from the loss down to the lowest trainable tensor: below it nothing
        needs a gradient, so autograd builds no graph there (a frozen tensor's input does not
        require grad) and the batched trainer (``simulator/batched.py``) likewise runs those
        blocks forward only. Walking the submodel in forward order (embeddings; per block ln_1,
        c_attn, attention, c_proj, ln_2, c_fc, c_proj; ln_f; the head), an op *has a
        gradient* when a trainable tensor lies strictly below it: every op's input depends on
        every tensor before it through the residual stream, so its input gradient is needed
        exactly then.

        FLOPs per token: 2 per matmul weight forward; 2 more for its input gradient where the
        op has a gradient; 2 more for its weight gradient where that weight trains. Attention
        (no weights) costs 4·T·inner forward (q·kᵀ and p·v at the full T, as PaLM counts it),
        and twice that backward (four products) where it has a gradient. With everything
        training this is PaLM's 6N + 12·L·inner·T; a window plan's frozen lower blocks cost
        their forward only. ``torch.utils.flop_counter`` measures the same figure on the built
        submodel (``tests/test_plan.py``).

        Memory: fp32 weights, and grads and two AdamW moments for the trainable tensors; and
        the activations backward keeps at batch x seq, for the blocks backward traverses (the
        one holding the lowest trainable tensor and those above it; all of them where an
        embedding trains): per block the residual/LayerNorm streams, q|k|v, the attention
        output and probabilities (the ExecuTorch and ORT programs materialise them; torch's CPU
        kernel keeps only their log-sum-exp), the MLP's two hidden tensors; plus the logits and
        their gradient. A frozen block below keeps nothing, but its forward holds its own
        intermediates while it runs, so at least one block's worth is counted. The per-token
        terms bound what eager torch keeps (its saved tensors, measured in the test)."""
        sub, trainable = self.shapes(cfg), set(self.trainable(cfg))
        params = sum(math.prod(s) for s in sub.values())
        n_train = sum(math.prod(sub[n]) for n in trainable)
        if not isinstance(cfg, GPTConfig):  # no model of activations for a user module
            return PlanCost(params, n_train, 4 * (params + 3 * n_train), 6.0 * params)
        d, a, m, T = cfg.n_embd, self.n_head(cfg) * cfg.head_dim, self.mlp_hidden(cfg), seq_len

        ops = {n.rsplit(".", 1)[0] for n in trainable}  # the modules whose weight or bias trains
        trains = ops.__contains__

        def matmul(weight: str, grad: bool) -> float:  # forward, input gradient, weight gradient
            return 2.0 * math.prod(sub[weight]) * (1 + grad + (weight in trainable))

        grad = trains("wte") or trains("wpe")  # a trainable tensor lies below the current op
        flops, kept = 0.0, 0
        for b in self.blocks:
            p = f"blocks.{b}."
            grad |= trains(p + "ln_1")
            kept += grad or any(o.startswith(p) for o in ops)  # backward reaches into this block
            flops += matmul(p + "attn.c_attn.weight", grad)
            grad |= trains(p + "attn.c_attn")
            flops += 4.0 * T * a * (1 + 2 * grad)
            flops += matmul(p + "attn.c_proj.weight", grad)
            grad |= trains(p + "attn.c_proj") or trains(p + "ln_2")
            flops += matmul(p + "mlp.c_fc.weight", grad)
            grad |= trains(p + "mlp.c_fc")
            flops += matmul(p + "mlp.c_proj.weight", grad)
            grad |= trains(p + "mlp.c_proj")
        grad |= trains("ln_f")
        flops += matmul("lm_head.weight" if "lm_head.weight" in sub else "wte.weight", grad)  # the head
        kept = max(kept, min(1, len(self.blocks)))
        per_token = kept * (6 * d + 4 * a + 2 * m + self.n_head(cfg) * T) + 3 * d + 2 * cfg.vocab_size
        memory = 4 * (params + 3 * n_train + batch_size * T * per_token)
        return PlanCost(params, n_train, memory, flops)


def full_plan(cfg: Model) -> Plan:
    """Every block, full width, everything trains (GPU nodes; the only plan of a user module)."""
    blocks = tuple(range(cfg.n_layer)) if isinstance(cfg, GPTConfig) else ()
    return Plan("full", blocks)


def window_plan(cfg: Model, name: str, window: int) -> Plan:
    """Every block at full width, only the last ``window`` blocks train, everything below (and
    the embeddings) frozen: the device computes the full model's forward, so what it trains gets
    the full model's true gradient. An early-exit prefix trains block 0 as if it were the last
    layer, and a width prefix trains a narrower network than the one evaluated; both are biased.
    Measured in the simulator (private text, seed 0, 20 versions, mixed / GPU nodes alone, all
    domains): devices training the last 2 blocks 0.989, the last block 0.998, the first block
    alone 1.038, every block 1.017, the early-exit and width tier table 1.003. Memory holds the whole model (the planner's
    ``cost`` counts it), the trainable window's grads and moments, and activations."""
    if not isinstance(cfg, GPTConfig):
        raise UserError(f"plan {name!r}: a window plan needs a GPT (a user module has only the full plan)")
    if not 1 <= window <= cfg.n_layer:
        raise UserError(f"plan {name!r}: window must be 1 to {cfg.n_layer} blocks, got {window}")
    return Plan(name, tuple(range(cfg.n_layer)), 1.0, tuple(f"blocks.{b}.*" for b in range(cfg.n_layer - window, cfg.n_layer)))


def rotating_windows(cfg: Model, name: str, window: int) -> tuple[Plan, ...]:
    """Every position of a ``window``-block window in the full model, bottom first: the plan
    at offset ``o`` keeps every block at full width and trains blocks ``o`` to
    ``o + window - 1``; the bottom one also trains the model's ends: the embeddings (``wte``,
    ``wpe``), the head (tied to ``wte``, or ``lm_head``) and ``ln_f``, so the top one is
    ``window_plan``'s. FedRolex (Alam et al.,
    2022) rolls a submodel's window across rounds so that every parameter receives client
    updates; a top window alone leaves the embeddings and the lower blocks to the GPU nodes, so
    devices alone can never train them. Each window gets the full model's true gradient: a
    lower window's flows back through the frozen blocks above it. The scheduler deals a tier's
    windows by version (``Scheduler.next_task``)."""
    window_plan(cfg, name, window)  # the same checks
    L = cfg.n_layer
    plans = []
    for o in range(L - window + 1):
        train = tuple(f"blocks.{b}.*" for b in range(o, o + window))
        if o == 0:
            train = ("wte.*", "wpe.*") + train + ("ln_f.*", "lm_head.*")
        plans.append(Plan(f"{name}@{o}", tuple(range(L)), 1.0, train))
    return tuple(plans)


def tier_plans(cfg: Model) -> dict[str, Plan]:
    """The default tier table. Shallower plans keep the *first* blocks (a DepthFL-style early
    exit: the submodel is a shallower GPT sharing the global bottom, with ln_f and the head on
    top); devices freeze the embeddings, whose grads and AdamW state dominate at 50k vocab."""
    if not isinstance(cfg, GPTConfig):
        return {"gpu": full_plan(cfg)}
    L = cfg.n_layer

    def first(n: int) -> tuple[int, ...]:
        return tuple(range(max(1, n)))

    return {
        "phone-low": Plan("phone-low", first(L // 4), 0.25, BODY),
        "phone-high": Plan("phone-high", first(L // 2), 0.5, BODY),
        "laptop": Plan("laptop", first(L), 0.5, BODY),
        "jetson": Plan("jetson", first(L), 1.0, BODY),
        "gpu": Plan("gpu", first(L)),
    }


def plans_table(spec: ModelSpec, batch_size: int, seq_len: int) -> list[dict[str, Any]]:
    """Rows for ``stamen plans --model M``: each tier's plan and its cost."""
    cfg = spec.gpt_config()
    model: Model = cfg if cfg is not None else {n: tuple(p.shape) for n, p in spec.build().named_parameters()}
    rows = []
    for tier, plan in tier_plans(model).items():
        c = plan.cost(model, batch_size, seq_len)
        rows.append({"tier": tier, "plan": plan.hash, "blocks": list(plan.blocks), "width": plan.width,
                     "train": list(plan.train), "params": c.params, "trainable": c.trainable_params,
                     "memory_mb": round(c.memory_bytes / 2**20, 1), "flops_per_token": c.flops_per_token})
    return rows
