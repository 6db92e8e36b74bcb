"""LoRA as a plan kind the server issues, end to end on loopback (issue 14, acceptance 2): a real
server process fine-tuning a saved tiny GPT-2 base with ``[lora]``, a gpu-role client, a device
edge client and a runtime-only reference device on ExecuTorch (the server publishes its plan's
bundle: the frozen base and the tokenizer ride in it, only the adapter travels), at three
different ranks; adapters uploaded, versions published and scored on held-out instructions;
then ``stamen export-model`` writes the adapter in PEFT's format, which ``peft`` loads with the
same logits as stamen's merged model."""

import json
import math
import os
import urllib.request
from pathlib import Path

import pytest
import torch

from federation_procs import stamen, start_client, start_device, start_server, tagged
from hf_models import save_tiny
from stamen.compression.codecs import decode
from stamen.core.lora import TRAIN, LoraPlan, described_space, load_adapter, merge
from stamen.core.model import ModelSpec
from stamen.core.plan import Plan
from stamen.mobile_bridge.device import plan_hash
from stamen.server.auth import create_token
from stamen.server.config import load_config
from stamen.server.store import published_weights, state_lora

FED = """
[lora]
rank = 8
base = "fp32"             # one precision for every tier: memory then grows with the rank
[aggregation]
buffer_k = 2
tau_max = 8
[training]
seq_len = 192             # the stdlib prompts are ~100-150 bytes: the response must fit after them
warmup_steps = 2
total_steps = 100
[evaluation]
every = 1                 # held-out instructions: the built-in set's validation split
batches = 1
batch_size = 4
[tiers.gpu]
steps = 6
batch_size = 4
[tiers.laptop]
steps = 4
batch_size = 4
[tiers.jetson]
steps = 4
batch_size = 4
[tiers.phone-high]
steps = 4
batch_size = 4
[tiers.phone-low]
steps = 4
batch_size = 4
"""
TASKS = 2

# The base lives in the session's folder (conftest.py's STAMEN_CACHE, removed at its end), saved
# at collection, so that the device's ExecuTorch bundle is exported ahead like the other modules'
# (~80 s on a loaded core): its cache key is the base's config and weight bytes, the plan, the
# tier's batch x seq_len and the adapter space, not the folder, so the server's export process
# finds it in the cache and publishes it; any difference in those and the server exports it itself.
# Each pytest-xdist worker collects this module and saves its own base (same bytes, same key):
# two processes writing one folder at once could hand a reader half a file.
SESSION = Path(os.environ["STAMEN_CACHE"]) / os.environ.get("PYTEST_XDIST_WORKER", "main")
BASE = save_tiny("gpt2", SESSION / "lora-base", positions=256)
MODEL = f"hf:{BASE}"
(SESSION / "lora-fed.toml").write_text(FED)
FEDERATION = load_config(SESSION / "lora-fed.toml")
SPACE = FEDERATION.lora.space(ModelSpec(MODEL))
PLANS = {t: p for t, (p,) in FEDERATION.plans(SPACE).items()}  # one plan per LoRA tier
EXPORTS = [dict(spec=ModelSpec(MODEL), plan=PLANS["phone-low"], runtime="executorch",
                batch_size=FEDERATION.tiers["phone-low"].batch_size, seq_len=FEDERATION.training.seq_len,
                lora=SPACE.describe())]


def get(url, token):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def tasks_of(out):
    return [json.loads(line[5:]) for line in out.splitlines() if line.startswith("TASK ")]


def test_plan_records_carry_the_lora_kind():
    plan = LoraPlan("lora-phone-low", 2, "int8", ("*.lora_B",))
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.hash == plan.hash and isinstance(again, LoraPlan)
    for p in (plan, LoraPlan("lora-gpu", 16, "fp32", TRAIN["fedavg"], checkpointing=True)):
        assert plan_hash(json.loads(p.to_json())) == p.hash  # the reference device names bundles alike
    assert plan.runtimes == ("torch",) and again.runtimes == ("torch",)  # an int8 base is torch's alone
    assert LoraPlan("x", 2, "fp32").runtimes == ("torch", "executorch")
    assert Plan.from_dict(Plan("p", (0, 1), 0.5).to_dict()) == Plan("p", (0, 1), 0.5)
    with pytest.raises(Exception, match="checkpointing"):
        Plan.from_dict({**plan.to_dict(), "checkpointing": "yes"})


@pytest.mark.timeout(600)
def test_lora_federation_over_http(tmp_path):
    memory = {t: PLANS[t].cost(SPACE, FEDERATION.tiers[t].batch_size, FEDERATION.training.seq_len).memory_bytes
              for t in PLANS}
    state = tmp_path / "state"
    server, url = start_server(state, SESSION / "lora-fed.toml", model=MODEL)
    try:
        admin, gpu_tok, dev_tok = (create_token(state, r) for r in ("admin", "gpu", "device"))
        clients = [start_client(url, gpu_tok, "stdlib", "gpu", 2**30, tmp_path / "gpu", TASKS),
                   start_client(url, dev_tok, "stdlib", "device", memory["laptop"] + 1, tmp_path / "d2", TASKS)]
        device = start_device(url, dev_tok, "executorch", "stdlib", tmp_path / "d1", TASKS, memory["phone-low"] + 1)
        logs = []
        for c in clients:
            out, _ = c.communicate(timeout=500)
            assert c.returncode == 0, out
            logs.append(tasks_of(out))
        out, _ = device.communicate(timeout=500)
        assert device.returncode == 0, out[-3000:]
        device_log, modules = tagged(out, "LOG"), tagged(out, "MODULES")
        status = json.loads(get(f"{url}/v1/status", admin))
        assert status["version"] >= 2  # 6 updates at K = 2
        assert status["loss_unit"] == "nats/response token"
        tiers = {c["client_id"]: c["tier"] for c in status["clients"]}
        ranks = sorted(PLANS[t].rank for t in tiers.values())
        assert len(set(ranks)) == 3 and ranks[-1] == 8 and ranks[0] == 1, tiers
        for entries in logs:
            assert len(entries) == TASKS
            assert all(e["outcome"] in ("accepted", "duplicate") and e["runtime"] == "torch" for e in entries)
        # The reference device trained the rank-1 plan's ExecuTorch bundle, published by the
        # server, with no stamen model or plan code, and its updates were taken.
        assert len(device_log) == TASKS and device_log[0]["bundle_downloads"] == 1
        assert all(e["plan"] == PLANS["phone-low"].hash and e["outcome"] in ("accepted", "stale") for e in device_log)
        assert any(e["outcome"] == "accepted" for e in device_log)
        assert not any(m.startswith(("stamen.core.model", "stamen.core.plan", "stamen.core.lora", "stamen.server"))
                       for m in modules)
        # Held-out evaluation of the adapter, from the starting version on.
        evals = {e["version"]: e["val_loss"] for e in status["evaluations"]}
        assert 0 in evals and len(evals) >= 2 and all(math.isfinite(v) for v in evals.values())
        assert "stamen_val_loss_latest" in get(f"{url}/metrics", admin).decode()
        # An update is only the adapter's slice, under the tier's codec: far below the base.
        base_bytes = sum(p.numel() * 4 for p in ModelSpec(MODEL).build(weights=False).parameters())
        assert max(e["upload_bytes"] for entries in logs for e in entries) < base_bytes / 10
        gpu_plan = PLANS["gpu"]
        published = decode(get(f"{url}/v1/weights/{status['version']}?plan={gpu_plan.hash}", admin)).tensors
        assert set(published) == set(SPACE) and any(t.abs().sum() > 0 for n, t in published.items()
                                                     if n.endswith("lora_B"))
    finally:
        server.terminate()
        server.communicate(timeout=120)

    # The final checkpoint holds the last version; export-model writes it in PEFT's format.
    assert state_lora(state) == SPACE.describe()
    version, adapter = published_weights(state, SPACE)
    assert version == status["version"]
    assert all(torch.equal(adapter[n], published[n]) for n in SPACE)
    r = stamen("export-model", "--state", state, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = LoraPlan("merged", SPACE.r_max).build(ModelSpec(MODEL).build(), described_space(
        ModelSpec(MODEL).build(weights=False), state_lora(state)))
    load_adapter(ours, adapter)
    with torch.no_grad():
        expected = merge(ours)(idx)
        hf = AutoModelForCausalLM.from_pretrained(BASE, local_files_only=True)
        peft_logits = PeftModel.from_pretrained(hf, tmp_path / "out" / "adapter").eval()(input_ids=idx).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", local_files_only=True)
        merged_logits = merged(input_ids=idx).logits
        base_logits = AutoModelForCausalLM.from_pretrained(BASE, local_files_only=True)(input_ids=idx).logits
    torch.testing.assert_close(peft_logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_logits, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base_logits).abs().max() > 1e-4  # the federation changed the model
