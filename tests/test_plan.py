import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stamen.core.errors import UserError
from stamen.core.model import GPT, PRESETS, GPTConfig, ModelSpec, gpt_param_count, load_weights, weights
from stamen.core.plan import Plan, full_plan, plans_table, rotating_windows, tier_plans, window_plan

CFG = PRESETS["gpt-tiny"]


def global_weights(seed: int = 0, cfg: GPTConfig = CFG) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {n: t.clone() for n, t in weights(GPT(cfg)).items()}


def test_full_plan_module_equals_global_model():
    torch.manual_seed(0)
    model = GPT(CFG)
    plan = full_plan(CFG)
    sub = plan.build(CFG)
    load_weights(sub, plan.extract(weights(model), CFG))
    idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(sub(idx), model(idx))


@pytest.mark.parametrize("plan", list(tier_plans(CFG).values()) + [Plan("mid", (1, 3), 0.75, ("blocks.3.*",))])
def test_extract_then_scatter_is_identity_on_covered_elements(plan):
    g = global_weights()
    before = {n: t.clone() for n, t in g.items()}
    sub = plan.extract(g, CFG)
    for t in sub.values():
        t.mul_(0)  # extract must hand out copies: the global weights stay untouched
    assert all(torch.equal(g[n], before[n]) for n in g)
    plan.scatter(g, plan.extract(before, CFG), CFG)
    assert all(torch.equal(g[n], before[n]) for n in g)
    # and scatter writes exactly the covered elements: scatter a marker, compare with the index
    marker = {n: torch.full_like(t, 7.0) for n, t in plan.extract(g, CFG).items()}
    plan.scatter(g, marker, CFG)
    for n, ix in plan.index(CFG).items():
        expect = before[n].clone()
        expect[ix] = 7.0
        assert torch.equal(g[n], expect), n


@pytest.mark.parametrize("blocks,width", [((0,), 0.25), ((0, 1), 0.5), ((1, 2, 3), 0.75), ((0, 1, 2, 3), 1.0)])
def test_built_submodel_param_count(blocks, width):
    plan = Plan("p", blocks, width)
    model = plan.build(CFG)
    n_params = sum(p.numel() for p in model.parameters())
    expect = gpt_param_count(CFG, len(blocks), plan.n_head(CFG), plan.mlp_hidden(CFG))
    assert n_params == expect == plan.cost(CFG, 2, 16).params
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == plan.shapes(CFG)


def test_width_keeps_prefix_heads_in_each_of_q_k_v():
    # Independent reference: head h of q, k, v sits at rows [h*hd, (h+1)*hd) of each third.
    plan = Plan("half", (0,), 0.5)
    g = global_weights()
    w = g["blocks.0.attn.c_attn.weight"]
    A, hd = CFG.n_head * CFG.head_dim, CFG.head_dim
    kept = plan.n_head(CFG) * hd
    expect = torch.cat([w[0:kept], w[A:A + kept], w[2 * A:2 * A + kept]])
    assert torch.equal(plan.extract(g, CFG)["blocks.0.attn.c_attn.weight"], expect)


def test_width_submodel_equals_global_model_with_the_cut_units_silenced():
    # Independent reference: zero the c_proj columns of the heads and hidden units a width cut
    # drops; then the global model computes exactly what the narrow submodel computes.
    plan = Plan("half", (0, 1, 2, 3), 0.5)
    g = global_weights()
    a, m = plan.n_head(CFG) * CFG.head_dim, plan.mlp_hidden(CFG)
    for b in range(CFG.n_layer):
        g[f"blocks.{b}.attn.c_proj.weight"][:, a:] = 0
        g[f"blocks.{b}.mlp.c_proj.weight"][:, m:] = 0
    ref = GPT(CFG)
    load_weights(ref, g)
    sub = plan.build(CFG)
    load_weights(sub, plan.extract(g, CFG))
    idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sub(idx), ref(idx), rtol=0, atol=1e-6)


def test_coverage_masks():
    plan = Plan("p", (1, 2), 0.5, ("blocks.2.*",))
    cov = plan.coverage(CFG)
    assert set(cov) == {n for n in global_weights() if n.startswith("blocks.2.")}
    m = cov["blocks.2.mlp.c_fc.weight"]
    assert m.shape == (CFG.mlp_hidden, CFG.n_embd)
    assert m[: CFG.mlp_hidden // 2].all() and not m[CFG.mlp_hidden // 2:].any()
    m = cov["blocks.2.mlp.c_proj.weight"]
    assert m[:, : CFG.mlp_hidden // 2].all() and not m[:, CFG.mlp_hidden // 2:].any()
    m = cov["blocks.2.attn.c_attn.bias"]
    assert m.sum() == 3 * 2 * CFG.head_dim
    assert cov["blocks.2.ln_1.weight"].all()
    # trainable set and requires_grad agree
    model = plan.build(CFG)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(plan.trainable(CFG))


def test_json_round_trip_and_stable_hash():
    plan = Plan("laptop", (0, 2), 0.5, ("blocks.*", "ln_f.*"))
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.hash == plan.hash
    # identity, not the label, makes the hash; the hash is a fixed function of the fields
    assert Plan("other", (0, 2), 0.5, ("blocks.*", "ln_f.*")).hash == plan.hash
    assert Plan("laptop", (0, 2), 0.75, ("blocks.*", "ln_f.*")).hash != plan.hash
    ident = json.dumps({"blocks": [0, 2], "width": 0.5, "train": ["blocks.*", "ln_f.*"]}, sort_keys=True)
    assert plan.hash == hashlib.sha256(ident.encode()).hexdigest()[:16]
    assert len(plan.to_json()) < 200


@pytest.mark.parametrize("bad", [{"name": "x"}, {"name": "x", "blocks": [2, 1], "width": 1, "train": ["*"]},
                                 {"name": "x", "blocks": [0], "width": 0, "train": ["*"]},
                                 {"name": "x", "blocks": [0], "width": 1, "train": []}, [1, 2]])
def test_bad_plans_are_user_errors(bad):
    with pytest.raises(UserError):
        Plan.from_dict(bad)
    with pytest.raises(UserError):
        Plan.from_json("{not json")
    with pytest.raises(UserError):
        Plan("x", (9,)).build(CFG)


def test_tiers_grow():
    costs = [p.cost(CFG, 8, 64) for p in tier_plans(CFG).values()]
    assert [c.memory_bytes for c in costs] == sorted(c.memory_bytes for c in costs)
    assert tier_plans(CFG)["gpu"] == Plan("gpu", (0, 1, 2, 3))

def test_full_model_flops_match_palm_formula():
    # 6N + 12·L·inner·T over matmul weights (N excludes the position table and biases/LayerNorms).
    T, d, L = 64, CFG.n_embd, CFG.n_layer
    n_mm = L * (4 * d * d + 2 * d * CFG.mlp_hidden) + CFG.vocab_size * d
    assert full_plan(CFG).cost(CFG, 1, T).flops_per_token == 6 * n_mm + 12 * L * d * T


UNTIED = GPTConfig(**{**CFG.__dict__, "tie_weights": False})
COST_PLANS = [  # (config, plan): every kind of lowest trainable tensor, with and without width cuts
    *((CFG, p) for p in tier_plans(CFG).values()),  # frozen embeddings: backward reaches block 0's ln_1
    (CFG, window_plan(CFG, "w2", 2)), (CFG, window_plan(CFG, "w1", 1)),  # frozen lower blocks: forward only
    *((CFG, p) for p in rotating_windows(CFG, "r", 2)),
    (CFG, Plan("mlp", (0, 1, 3), 0.5, ("blocks.3.mlp.*",))),  # the lowest trainable tensor inside a block
    (CFG, Plan("ln_f", (0, 1, 2, 3), 1.0, ("ln_f.*",))),  # no block has a gradient
    (UNTIED, Plan("head", (0, 2), 1.0, ("lm_head.*",))), (UNTIED, full_plan(UNTIED)),
]


def _measured(cfg: GPTConfig, plan: Plan, B: int, T: int) -> tuple[float, int]:
    """One training step of the plan's real submodel (requires_grad as the plan says): the
    FLOPs torch's flop counter counts (matmuls; attention through the math kernel, which runs
    its four products as the ExecuTorch and ORT programs do) and the bytes of the activations
    autograd saves for backward (distinct storages, the weights excepted)."""
    model = plan.build(cfg)
    g = torch.Generator().manual_seed(0)
    idx, tgt = (torch.randint(0, cfg.vocab_size, (B, T), generator=g) for _ in range(2))
    weights_at = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights_at:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(idx, tgt)
        if loss.requires_grad:
            loss.backward()
    return counter.get_total_flops() / (B * T), sum(saved.values())


@pytest.mark.parametrize("cfg,plan", COST_PLANS, ids=[f"{c is UNTIED and 'untied-' or ''}{p.name}" for c, p in COST_PLANS])
def test_cost_counts_what_training_the_plan_computes(cfg, plan):
    """Oracle: torch.utils.flop_counter on a real forward + backward of the plan's submodel.
    Backward stops at the lowest trainable tensor, so a window plan's frozen lower blocks cost
    their forward only (and keep no activations), while frozen embeddings below block 0's
    trainable ln_1 save nothing (every matmul still needs its input gradient)."""
    B, T = 2, 32
    flops, saved = _measured(cfg, plan, B, T)
    c = plan.cost(cfg, B, T)
    assert c.flops_per_token == flops
    activations = c.memory_bytes - 4 * (c.params + 3 * c.trainable_params)
    # Above what autograd saves, by less than twice it plus one block (a frozen block's forward
    # intermediates, counted once) and the logits' gradients, which backward allocates.
    d, a, H = cfg.n_embd, plan.n_head(cfg) * cfg.head_dim, plan.n_head(cfg)
    block = 6 * d + 4 * a + 2 * plan.mlp_hidden(cfg) + H * T
    assert saved <= activations <= 2 * saved + 4 * B * T * (block + 3 * d + 2 * cfg.vocab_size)


def test_window_plans_cost_less_than_the_full_model():
    """Independent count: the window plan's FLOPs per token by hand, from the shapes. Every
    block forward (2 per matmul weight, attention 4·T·d), the window's blocks backward too
    (input and weight gradients, attention x3), the head forward and input gradient (tied to
    the frozen wte)."""
    T, d, L, mh, V = 64, CFG.n_embd, CFG.n_layer, CFG.mlp_hidden, CFG.vocab_size
    per_block = 4 * d * d + 2 * d * mh
    for window in (1, 2, L):
        want = 2 * L * per_block + 4 * L * d * T + window * (4 * per_block + 8 * d * T) + 4 * V * d
        assert window_plan(CFG, "w", window).cost(CFG, 1, T).flops_per_token == want
    full = full_plan(CFG).cost(CFG, 8, T)
    top = window_plan(CFG, "w", 2).cost(CFG, 8, T)
    assert top.flops_per_token < full.flops_per_token and top.memory_bytes < full.memory_bytes


def test_user_module_has_only_the_full_plan():
    shapes = {"a.weight": (3, 4), "a.bias": (3,)}
    plan = full_plan(shapes)
    assert tier_plans(shapes) == {"gpu": plan}
    g = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3)}
    assert all(torch.equal(t, g[n]) for n, t in plan.extract(g, shapes).items())
    assert plan.trainable(shapes) == ["a.weight", "a.bias"]
    with pytest.raises(UserError):
        Plan("half", (), 0.5).extract(g, shapes)


def test_plans_table_rows():
    rows = plans_table(ModelSpec("gpt-small"), 8, 256)
    assert [r["tier"] for r in rows] == ["phone-low", "phone-high", "laptop", "jetson", "gpu"]
    assert rows[-1]["params"] == rows[-1]["trainable"] == gpt_param_count(PRESETS["gpt-small"])
    assert set(rows[0]) >= {"tier", "blocks", "width", "params", "trainable", "memory_mb", "flops_per_token"}


@pytest.mark.parametrize("window", [1, 2, 4])
def test_window_plan_trains_the_last_blocks_of_the_full_model(window):
    """A window plan keeps the whole model (so the built submodel computes exactly the global
    model's forward) and trains the last ``window`` blocks' tensors, nothing else."""
    plan = window_plan(CFG, "w", window)
    torch.manual_seed(0)
    model = GPT(CFG)
    sub = plan.build(CFG)
    load_weights(sub, plan.extract(weights(model), CFG))
    idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(sub(idx), model(idx))
    last = range(CFG.n_layer - window, CFG.n_layer)
    want = sorted(n for n, _ in model.named_parameters() if any(n.startswith(f"blocks.{b}.") for b in last))
    assert sorted(n for n, p in sub.named_parameters() if p.requires_grad) == want == sorted(plan.trainable(CFG))
    n_train = sum(p.numel() for n, p in model.named_parameters() if n in want)
    assert plan.cost(CFG, 4, 64).trainable_params == n_train
    assert plan.cost(CFG, 4, 64).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("window", [1, 2, 4])
def test_rotating_windows_cover_every_tensor_with_the_full_models_gradient(window):
    """Every window position, bottom first, each training ``window`` consecutive blocks of the
    full model; the bottom one the model's ends too (embeddings, tied head, ln_f), so the top
    one is the top-window plan's; together every tensor.
    Reference: the full model's own gradient, from autograd on the unsplit model, restricted
    to the tensors each window trains (a lower window's gradient flows back through the
    frozen blocks above it unchanged)."""
    windows = rotating_windows(CFG, "r", window)
    L = CFG.n_layer
    assert [w.name for w in windows] == [f"r@{o}" for o in range(L - window + 1)]
    torch.manual_seed(0)
    model = GPT(CFG)
    g = torch.Generator().manual_seed(1)
    idx, tgt = (torch.randint(0, CFG.vocab_size, (2, 16), generator=g) for _ in range(2))
    F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten()).backward()
    names = [n for n, _ in model.named_parameters()]
    covered = set()
    for o, plan in enumerate(windows):
        want = {n for n in names if any(n.startswith(f"blocks.{b}.") for b in range(o, o + window))}
        want |= {n for n in names if n.split(".")[0] in ("wte", "wpe", "ln_f")} if o == 0 else set()
        assert set(plan.trainable(CFG)) == want and plan.blocks == tuple(range(L)) and plan.width == 1.0
        covered |= want
        sub = plan.build(CFG)
        load_weights(sub, plan.extract(weights(model), CFG))
        F.cross_entropy(sub(idx).flatten(0, 1), tgt.flatten()).backward()
        grads = {n: p.grad for n, p in sub.named_parameters() if p.requires_grad}
        assert set(grads) == want
        for n, p in model.named_parameters():
            if n in want:
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)
    assert covered == set(names)
    if window < L:
        assert windows[-1].hash == window_plan(CFG, "r", window).hash
    with pytest.raises(UserError, match="window must be 1 to"):
        rotating_windows(CFG, "r", L + 1)


@pytest.mark.parametrize("window", [0, CFG.n_layer + 1])
def test_window_plan_refuses_a_window_the_model_lacks(window):
    with pytest.raises(UserError, match="window must be 1 to"):
        window_plan(CFG, "w", window)
    with pytest.raises(UserError, match="needs a GPT"):
        window_plan({"w": (2, 2)}, "w", 1)
