import subprocess
import sys

import pytest
import torch

from stamen.core.errors import UserError
from stamen.core.data import VOCAB_SIZE
from stamen.core.model import GPT, PRESETS, GPTConfig, ModelSpec, gpt_param_count, load_weights, weights


def formula(cfg: GPTConfig) -> int:
    """GPT-2's count written out independently: per block 12 d^2 + 13 d at the default shape."""
    d, V, T, L = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
    assert cfg.head_dim * cfg.n_head == d and cfg.mlp_hidden == 4 * d and cfg.bias and cfg.tie_weights
    return V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_counts_match_closed_form(name):
    cfg = PRESETS[name]
    assert gpt_param_count(cfg) == formula(cfg)
    if name in ("gpt-tiny", "gpt-small", "gpt-125m"):  # build the module where it is cheap
        assert sum(p.numel() for p in GPT(cfg).parameters()) == formula(cfg)


def test_preset_sizes_are_what_their_names_say():
    """GPT-2/3 shapes with the bytes tokenizer's vocabulary: the names' counts less GPT-2's
    50,304-row embedding, which the bytes tokenizer could never index."""
    counts = {n: gpt_param_count(c) for n, c in PRESETS.items()}
    assert {c.vocab_size for c in PRESETS.values()} == {VOCAB_SIZE}
    assert counts["gpt-tiny"] < 500_000
    assert 9e6 < counts["gpt-small"] < 12e6
    gpt2_embedding = {"gpt-125m": 50304 * 768, "gpt-350m": 50304 * 1024, "gpt-1.3b": 50304 * 2048}
    assert 120e6 < counts["gpt-125m"] - 256 * 768 + gpt2_embedding["gpt-125m"] < 130e6
    assert 340e6 < counts["gpt-350m"] - 256 * 1024 + gpt2_embedding["gpt-350m"] < 370e6
    assert 1.25e9 < counts["gpt-1.3b"] - 256 * 2048 + gpt2_embedding["gpt-1.3b"] < 1.4e9


def test_submodel_count_and_global_names():
    cfg = PRESETS["gpt-tiny"]
    sub = GPT(cfg, block_ids=(1, 3), n_head=2, mlp_hidden=128)
    assert sum(p.numel() for p in sub.parameters()) == gpt_param_count(cfg, n_layer=2, n_head=2, mlp_hidden=128)
    names = set(weights(sub))
    assert "blocks.3.attn.c_attn.weight" in names and "blocks.0.ln_1.weight" not in names
    assert sub.blocks["3"].attn.c_attn.weight.shape == (3 * 2 * cfg.head_dim, cfg.n_embd)


def test_untied_head_counts_its_own_matrix():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, tie_weights=False)
    assert sum(p.numel() for p in GPT(cfg).parameters()) == gpt_param_count(cfg)
    assert "lm_head.weight" in weights(GPT(cfg))


def test_forward_is_causal():
    torch.manual_seed(0)
    model = GPT(PRESETS["gpt-tiny"]).eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[0, :10], b[0, :10]) and not torch.allclose(a[0, 10:], b[0, 10:])


def test_weights_round_trip():
    a, b = GPT(PRESETS["gpt-tiny"]), GPT(PRESETS["gpt-tiny"])
    load_weights(b, weights(a))
    assert all(torch.equal(weights(a)[n], weights(b)[n]) for n in weights(a))
    with pytest.raises(KeyError):
        load_weights(b, {"wte.weight": weights(a)["wte.weight"]})


def test_spec_hash_is_stable_across_processes():
    code = "from stamen.core.model import ModelSpec; print(ModelSpec('gpt-small').hash)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == ModelSpec("gpt-small").hash
    assert ModelSpec("gpt-small").hash != ModelSpec("gpt-tiny").hash
    assert hash(ModelSpec("gpt-tiny")) == hash(ModelSpec("gpt-tiny"))


def test_unknown_model_and_factories():
    with pytest.raises(UserError, match="unknown model"):
        ModelSpec("gpt-huge")
    with pytest.raises(UserError, match="cannot load model factory"):
        ModelSpec("no_such_module:fn").build()
    spec = ModelSpec("torch.nn:Identity")  # any importable callable returning a module
    assert isinstance(spec.build(), torch.nn.Identity) and spec.gpt_config() is None
