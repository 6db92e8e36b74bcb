"""Acceptance 3 and 4 with real processes on loopback: a server, a gpu-role torch client, an
ORT reference device and an ExecuTorch reference device in one federation; all three updates
are aggregated into one version, and the devices never import stamen's model or plan code.
Then a corrupted cached bundle is refused and downloaded again."""

import pytest

from federation_procs import start_client, start_device, start_server, stdlib_folders, tagged
from stamen.core.model import PRESETS, ModelSpec
from stamen.core.plan import Plan, tier_plans
from stamen.mobile_bridge.bundle import publish_bundle
from stamen.mobile_bridge.device import ReferenceDevice, plan_hash
from stamen.cli_federation import fetch_status
from stamen.server.auth import create_token

SPEC = ModelSpec("gpt-tiny")
CFG = PRESETS["gpt-tiny"]
PLAN = tier_plans(CFG)["phone-high"]  # what a device declaring 8 MiB gets at batch 8 x seq 64
EXPORTS = [dict(spec=SPEC, plan=PLAN, runtime=r, batch_size=8, seq_len=64) for r in ("ort", "executorch")]  # conftest.py
FED = """
[training]
seq_len = 64
total_steps = 100
warmup_steps = 2
[aggregation]
tau_max = 2
buffer_k = 3
[tiers.gpu]
steps = 6
batch_size = 8
[tiers.phone-high]
steps = 4
batch_size = 8
"""
def test_plan_hash_matches_plan():
    for plan in [*tier_plans(CFG).values(), Plan("x", (1, 3), 0.5, ("blocks.3.*",))]:
        assert plan_hash(plan.to_dict()) == plan.hash


@pytest.mark.timeout(600)
def test_reference_devices_join_a_mixed_federation(tmp_path, export_cache):
    (tmp_path / "fed.toml").write_text(FED)
    state = tmp_path / "state"
    for runtime in ("ort", "executorch"):  # what the server's export step publishes
        publish_bundle(SPEC, PLAN, runtime, state / "bundles", 8, 64, export_cache)
    server, url = start_server(state, tmp_path / "fed.toml")
    try:
        gpu_tok = create_token(state, "gpu")
        data = stdlib_folders(tmp_path, [["json"], ["email"], ["logging"]])
        procs = [start_client(url, gpu_tok, data[0], "gpu", 1 << 30, tmp_path / "gpu", 1)]
        for i, runtime in enumerate(("ort", "executorch"), 1):
            procs.append(start_device(url, create_token(state, "device"), runtime, data[i], tmp_path / f"dev{i}"))
        outs = [p.communicate(timeout=500)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-3000:]
        for out in outs[1:]:
            (entry,) = tagged(out, "LOG")
            assert entry["plan"] == PLAN.hash and entry["steps"] == 4 and entry["bundle_downloads"] == 1
            assert entry["outcome"] == "accepted"
            modules = tagged(out, "MODULES")
            assert "stamen.core.model" not in modules and "stamen.core.plan" not in modules
            assert not any(m.startswith(("stamen.edge_client", "stamen.server", "stamen.compression")) for m in modules)
        status = fetch_status(url, create_token(state, "admin"))
        assert status["version"] == 1 and status["buffered"] == 0  # K = 3 updates made version 1
        assert sorted(c["updates"] for c in status["clients"]) == [1, 1, 1]

        # Acceptance 4, device side: a corrupted cached bundle is refused and downloaded again.
        dev = ReferenceDevice(url, create_token(state, "device"), "ort", str(data[1]), tmp_path / "dev1")
        dev.join()
        folder, downloads = dev.bundle(PLAN.hash)
        assert downloads == 0  # the first run's download is still good
        with open(folder / "training_model.onnx", "r+b") as f:
            f.seek(64)
            f.write(b"corrupt!")
        folder, downloads = dev.bundle(PLAN.hash)
        assert downloads == 1
        (folder / "checkpoint").unlink()
        assert dev.bundle(PLAN.hash)[1] == 1
    finally:
        server.terminate()
        server.wait(timeout=60)
