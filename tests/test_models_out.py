"""Models out: a server's state, a baseline's and a simulation's final weights as a standard
folder that transformers loads as GPT-2 with stamen's logits, and ``stamen generate``."""

import json

import pytest
import torch

from federation_procs import stamen
from stamen.core.errors import UserError
from stamen.core.gpt2 import load_model, save_model
from stamen.core.model import GPT, GPTConfig, ModelSpec, load_weights, weights
from stamen.core.plan import full_plan
from stamen.core.records import Update
from stamen.core.sample import generate
from stamen.server.config import load_config
from stamen.server.service import Federation
from stamen.server.store import Store, bind_model, published_weights

transformers = pytest.importorskip("transformers")


def hf_logits(folder, x):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        return model(x).logits


def stamen_logits(cfg, state, x):
    model = GPT(cfg).eval()
    load_weights(model, state)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("cfg", [
    GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=16),
    GPTConfig(vocab_size=256, block_size=32, n_layer=3, n_head=4, n_embd=32, mlp_hidden=48, tie_weights=False),
])
def test_gpt2_layout_gives_stamen_logits_in_transformers(cfg, tmp_path, monkeypatch):
    torch.manual_seed(1)
    state = {n: t + 0.05 * torch.randn_like(t) for n, t in weights(GPT(cfg)).items()}  # biases and LNs non-trivial
    monkeypatch.setattr(ModelSpec, "gpt_config", lambda self: cfg)
    save_model(ModelSpec("gpt-tiny"), state, tmp_path)
    x = torch.randint(0, 256, (3, 20))
    expected = stamen_logits(cfg, state, x)
    torch.testing.assert_close(hf_logits(tmp_path, x), expected, rtol=0, atol=1e-5)
    back, config = load_model(tmp_path)  # and the folder reads back into stamen exactly
    assert all(torch.equal(back.state_dict()[n], state[n]) for n in state)
    assert config["stamen"]["tokenizer"] == "bytes"


def _federation_state(tmp_path):
    state = tmp_path / "state"
    fed = Federation("gpt-tiny", state, load_config(None))
    fed.close()
    return state


def test_export_model_from_a_server_state(tmp_path):
    state = _federation_state(tmp_path)
    r = stamen("export-model", "--state", state, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "gpt-tiny version 0" in r.stdout
    version, w = published_weights(state, ModelSpec("gpt-tiny").gpt_config())
    x = torch.randint(0, 256, (2, 40))
    torch.testing.assert_close(hf_logits(tmp_path / "out", x), stamen_logits(ModelSpec("gpt-tiny").gpt_config(), w, x),
                               rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["stamen"]["version"] == 0


def test_export_model_takes_the_newest_version_not_the_last_checkpoint(tmp_path):
    """A running server checkpoints every ``checkpoint_every`` versions; the versions after the
    newest checkpoint live in its journal, and export-model replays them as a restart would."""
    from stamen.server.config import load_config as federation

    cfg = ModelSpec("gpt-tiny").gpt_config()
    state = tmp_path / "state"
    store = Store(state, checkpoint_every=100)
    bind_model(state, "gpt-tiny")
    agg = store.start(cfg, weights(GPT(cfg)), federation(None).aggregator_config())  # checkpoints v0 only
    full = full_plan(cfg)
    for i in range(3 * agg.config.buffer_k):
        gen = torch.Generator().manual_seed(i)
        delta = {n: 1e-3 * torch.randn(s, generator=gen) for n, s in full.shapes(cfg).items()}
        store.accept(agg, Update(f"t{i}", agg.version, full, delta, 100), float(i))
    assert agg.version == 3 and len(list((state / "checkpoints").glob("*.safetensors"))) == 1
    r = stamen("export-model", "--state", state, "--out", tmp_path / "out")  # the store stays open
    assert r.returncode == 0 and "gpt-tiny version 3 in" in r.stdout, r.stderr
    back, _ = load_model(tmp_path / "out")
    assert all(torch.equal(back.state_dict()[n], t) for n, t in agg.weights.items())
    version, older = published_weights(state, cfg, 2)
    assert version == 2 and all(torch.equal(older[n], t) for n, t in agg.history[2].items())
    store.close()


@pytest.mark.parametrize("args, message", [
    (["--version", "7"], "version 7 is not kept in"),
    (["--state", "{nostate}"], "holds no federation"),
])
def test_export_model_mistakes_are_one_line(args, message, tmp_path):
    state = _federation_state(tmp_path)
    args = [a.format(nostate=tmp_path / "typo") for a in args]
    base = ["--state", str(state)] if "--state" not in args else []
    r = stamen("export-model", *base, *args, "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_a_state_folder_keeps_its_model(tmp_path):
    state = _federation_state(tmp_path)
    with pytest.raises(UserError, match="holds a federation of 'gpt-tiny', not 'gpt-small'"):
        Federation("gpt-small", state, load_config(None))


def test_generate_samples_from_a_model_folder_deterministically(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("gpt-tiny")
    model = spec.build().eval()
    save_model(spec, weights(model), tmp_path / "m")
    runs = [stamen("generate", "--model", tmp_path / "m", "--prompt", "def main(", "--max-new-tokens", "30",
                   "--seed", s) for s in (3, 3, 4)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout
    expected = generate(model, "def main(", 30, 0.8, 40, seed=3, block_size=128) + "\n"
    assert runs[0].stdout == expected.replace("\r\n", "\n").replace("\r", "\n")  # text mode's newlines
    greedy = generate(model, "ab", 5, temperature=0)
    ids = list(b"ab")
    for _ in range(5):  # greedy decoding by hand
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == bytes(ids[2:]).decode("utf-8", errors="replace")


def test_generate_refuses_a_folder_that_is_no_model(tmp_path):
    r = stamen("generate", "--model", tmp_path, "--prompt", "x")
    assert r.returncode == 2 and "not a model folder" in r.stderr and r.stderr.count("\n") == 1
