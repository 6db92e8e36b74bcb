"""Evaluation as a step of the federation (issue 15, acceptance 1): a federation trains over
loopback, the server scores each published version on held-out text and shows the history in
/v1/status, /metrics and its log (and keeps it across a restart); ``stamen export-model`` writes
a folder transformers loads with stamen's logits, and ``stamen generate`` prints text from it."""

import json
import re
import time
import urllib.request

import pytest
import torch
from torch.nn import functional as F

from federation_procs import start_client, start_server, stamen, stdlib_folders
from stamen.core.errors import UserError
from stamen.core.model import PRESETS, GPT, load_weights
from stamen.core.train import evaluate
from stamen.server.auth import create_token
from stamen.server.config import load_config
from stamen.server.evaluation import Evaluator
from stamen.server.service import Federation
from stamen.server.store import published_weights

CFG = PRESETS["gpt-tiny"]
FED = """
[aggregation]
buffer_k = 1
[training]
seq_len = 32
warmup_steps = 2
[tiers.gpu]
steps = 20
batch_size = 8
[evaluation]
every = 1
batches = 3
batch_size = 4
"""


def get(url, token=None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.read()


def test_the_held_out_score_is_the_one_training_code_computes(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    ev = Evaluator.text(CFG, "stdlib", 2, 4, 32)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ev.score(5, w).val_loss == evaluate(model, ev.batches) and ev.tokens == 2 * 4 * 32


def test_history_is_kept_in_the_state_and_bad_settings_refused(tmp_path):
    (tmp_path / "fed.toml").write_text(FED)
    fed = load_config(tmp_path / "fed.toml")
    first = Federation("gpt-tiny", tmp_path / "s", fed)
    assert [e["version"] for e in first.status()["evaluations"]] == [0]
    v0 = first.status()["evaluations"][0]["val_loss"]
    first.close()
    again = Federation("gpt-tiny", tmp_path / "s", fed)  # restarted: v0 is not scored twice
    assert [(e["version"], e["val_loss"]) for e in again.status()["evaluations"]] == [(0, v0)]
    again.close()
    (tmp_path / "bad.toml").write_text("[evaluation]\nevery = -1\n")
    with pytest.raises(UserError, match=r"\[evaluation\]: every must be >= 0"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(UserError, match="data source not found"):
        Federation("gpt-tiny", tmp_path / "new", fed, eval_data=str(tmp_path / "nope"))
    assert not (tmp_path / "new").exists()  # a bad held-out source changes nothing


@pytest.mark.timeout(600)
def test_federation_evaluates_exports_and_generates(tmp_path):
    (tmp_path / "fed.toml").write_text(FED)
    state = tmp_path / "state"
    server, url = start_server(state, tmp_path / "fed.toml")
    try:
        [data] = stdlib_folders(tmp_path, [["json", "csv"]])
        client = start_client(url, create_token(state, "gpu"), data, "gpu", 2**30, tmp_path / "c", 3)
        out = client.communicate(timeout=300)[0]
        assert client.returncode == 0, out
        admin = create_token(state, "admin")
        for _ in range(300):  # scoring runs on its own thread: the newest version's score follows it
            status = json.loads(get(url + "/v1/status", admin))
            if status["evaluations"][-1]["version"] == status["version"]:
                break
            time.sleep(0.1)
        metrics = get(url + "/metrics", admin).decode()
    finally:
        server.terminate()
        log = server.communicate(timeout=60)[0]
    evals = status["evaluations"]
    # Scoring takes at most a tenth of the server's time (service.EVAL_SHARE): a version published
    # while the scorer works or rests is skipped, the newest never. Which of versions 1 and 2 a
    # loaded machine skips is timing (the scorer fell behind in 1 of 3 parallel suite runs), so
    # the scored versions are asserted as the policy promises: from v0, in order, to the newest.
    scored = [e["version"] for e in evals]
    assert status["version"] == 3 and scored[0] == 0 and scored[-1] == 3 and scored == sorted(set(scored)), scored
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2, evals  # the federation learned something
    for v in (1, 2, 3):  # one log line per published version
        assert re.search(rf"version {v}: 1 updates, ", log), log
    for e in evals:  # and one per score, each in /metrics
        assert f'stamen_val_loss{{version="{e["version"]}"}} {e["val_loss"]:g}' in metrics
        if e["version"]:
            assert re.search(rf"version {e['version']}: validation loss {e['val_loss']:.4f} on 384 held-out tokens", log), log
    assert f"stamen_val_loss_latest {evals[-1]['val_loss']:g}" in metrics

    exported = stamen("export-model", "--state", state, "--out", tmp_path / "model")
    assert exported.returncode == 0 and "version 3" in exported.stdout, exported.stderr
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    version, w = published_weights(state, CFG)
    ours = GPT(CFG).eval()
    load_weights(ours, w)
    ev = Evaluator.text(CFG, "stdlib", 3, 4, 32)  # the server's held-out batches (same source, sizes, seed)
    with torch.no_grad():
        for x, _ in ev.batches:
            torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=1e-5)
        hf_loss = sum(F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item() for x, y in ev.batches) / 3
    assert version == 3 and hf_loss == pytest.approx(evals[-1]["val_loss"], abs=1e-5)

    text = stamen("generate", "--model", tmp_path / "model", "--prompt", "import ", "--max-new-tokens", "40")
    assert text.returncode == 0 and len(text.stdout.strip()) > 0, text.stderr

    server, url = start_server(state, tmp_path / "fed.toml")  # the history survives a restart
    try:
        assert json.loads(get(url + "/v1/status", create_token(state, "admin")))["evaluations"] == evals
    finally:
        server.terminate()
        server.communicate(timeout=60)
