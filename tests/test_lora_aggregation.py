"""Adapters of unequal rank through the real aggregator, against references written here
component by component: FedAvg of A and B (FlowerTune), and the exact rule (FFA-LoRA: A frozen)."""

import torch

from stamen.core.lora import TRAIN, BaseStats, LoraPlan, LoraSpace
from stamen.core.records import Update
from stamen.server.aggregator import Aggregator, AggregatorConfig
from stamen.server.outer import OuterConfig

R_MAX = 8
SPACE = LoraSpace({"l0.q": (6, 5, False), "l1.q": (6, 7, True)}, R_MAX, 16.0,
                  BaseStats(100, 80, 2, 6, 12, 2, 10, False, False))
FEDAVG = AggregatorConfig(buffer_k=3, tau_max=0, outer=OuterConfig(kind="fedavg", lr=1.0))


def client_adapter(plan: LoraPlan, start: dict, seed: int) -> dict[str, torch.Tensor]:
    """A client's trained adapter: its slice of ``start`` moved by a seeded random step."""
    g = torch.Generator().manual_seed(seed)
    sub = plan.extract(start, SPACE)
    return {n: t + torch.randn(t.shape, generator=g) if n in plan.trainable(SPACE) else t for n, t in sub.items()}


def run(plans: list[LoraPlan], tokens: list[int], start: dict) -> tuple[dict, list[dict]]:
    agg = Aggregator(SPACE, start, FEDAVG)
    trained = [client_adapter(p, start, seed) for seed, p in enumerate(plans)]
    for i, (p, local, t) in enumerate(zip(plans, trained, tokens)):
        base = p.extract(start, SPACE)
        delta = {n: base[n] - local[n] for n in p.trainable(SPACE)}
        agg.submit(Update(f"t{i}", 0, p, delta, t), now=0.0)
    assert agg.version == 1
    return agg.weights, trained


def test_fedavg_of_a_and_b_averages_each_rank_component_over_the_clients_that_trained_it():
    start = SPACE.init(0)
    start = {n: t + 0.1 for n, t in start.items()}  # B nonzero too
    plans = [LoraPlan(f"r{r}", r) for r in (2, 4, 4)]
    tokens = [100, 300, 50]
    new, trained = run(plans, tokens, start)
    for n in SPACE:
        dim = 0 if n.endswith(".lora_A") else 1
        for j in range(R_MAX):  # reference: a plain loop over rank components
            covering = [(t, local[n].select(dim, j)) for p, t, local in zip(plans, tokens, trained) if j < p.rank]
            expect = (sum(t * v for t, v in covering) / sum(t for t, _ in covering) if covering
                      else start[n].select(dim, j))
            assert torch.allclose(new[n].select(dim, j), expect, atol=1e-6), (n, j)


def test_exact_rule_gives_the_average_of_the_clients_products():
    start = SPACE.init(0)  # A random, B zero: the exact rule never moves A
    exact = [LoraPlan("full", R_MAX, train=TRAIN["exact"])] * 3
    tokens = [100, 300, 50]
    new, trained = run(exact, tokens, start)
    total = sum(tokens)
    for m in SPACE.targets:
        a, b = m + ".lora_A", m + ".lora_B"
        assert torch.equal(new[a], start[a])
        mean_product = sum(t * local[b] @ local[a] for t, local in zip(tokens, trained)) / total
        assert torch.allclose(new[b] @ new[a], mean_product, atol=1e-5)
    # FedAvg of A and B on the same clients does not: the cross terms B_k A_l stay in the product.
    fedavg = [LoraPlan("full", R_MAX)] * 3
    new, trained = run(fedavg, tokens, start)
    m = next(iter(SPACE.targets))
    mean_product = sum(t * local[m + ".lora_B"] @ local[m + ".lora_A"] for t, local in zip(tokens, trained)) / total
    error = (new[m + ".lora_B"] @ new[m + ".lora_A"] - mean_product).norm() / mean_product.norm()
    assert error > 0.1


def test_exact_rule_with_unequal_ranks_averages_each_component_of_the_product():
    start = SPACE.init(1)
    plans = [LoraPlan(f"r{r}", r, train=TRAIN["exact"]) for r in (2, 8, 4)]
    tokens = [200, 100, 100]
    new, trained = run(plans, tokens, start)
    for m in SPACE.targets:
        a, b = m + ".lora_A", m + ".lora_B"
        expect = torch.zeros(SPACE[b][0], SPACE[a][1])
        for j in range(R_MAX):  # ΔW = Σ_j b̄_j a_jᵀ, b̄_j over the clients whose rank reaches j
            covering = [(t, local[b][:, j]) for p, t, local in zip(plans, tokens, trained) if j < p.rank]
            b_j = sum(t * v for t, v in covering) / sum(t for t, _ in covering)
            expect += torch.outer(b_j, start[a][j])
        assert torch.allclose(new[b] @ new[a], expect, atol=1e-5)
