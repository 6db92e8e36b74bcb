"""The edge client trains with ONNX Runtime Training and ExecuTorch against a real server
process on loopback: it downloads its plan's bundle (which the server exports on first need),
verifies it, trains, and its update is aggregated with another runtime's. A corrupted or
incomplete cached bundle is refused with its reason and downloaded again. ``--runtime auto``
declares what ``available_runtimes`` finds; a runtime the machine lacks is a one-line error."""

import sys

import pytest

from federation_procs import start_server, stdlib_folders
from stamen.core.errors import UserError
from stamen.core.model import PRESETS, ModelSpec
from stamen.core.plan import tier_plans
from stamen.core.records import Capabilities
from stamen.edge_client.bundle_runtime import available_runtimes
from stamen.edge_client.client import EdgeClient, declared_runtimes
from stamen.cli_federation import fetch_status
from stamen.server.auth import create_token
from stamen.server.config import load_config
from stamen.server.scheduler import Scheduler

CFG = PRESETS["gpt-tiny"]
PLAN = tier_plans(CFG)["phone-high"]  # what 8 MiB gets at batch 8 x the default seq_len 64
EXPORTS = [dict(spec=ModelSpec("gpt-tiny"), plan=PLAN, runtime=r, batch_size=8, seq_len=64)  # what the server publishes
           for r in ("ort", "executorch")]  # made ahead: conftest.py
MiB = 2**20
FED = """
[aggregation]
buffer_k = 2
tau_max = 4
[tiers.phone-high]
steps = 4
batch_size = 8
"""


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A server and two data folders. The server's export cache is the session's (conftest.py):
    the programs are test_bundle_device's (phone-high at 8 x 64), exported once, ahead;
    test_server_bundles is the one that has a server really export on first need."""
    root = tmp_path_factory.mktemp("runtimes")
    (root / "fed.toml").write_text(FED)
    proc, url = start_server(root / "state", root / "fed.toml")
    yield root, url, stdlib_folders(root, [["json"], ["email"]])
    proc.terminate()
    proc.communicate(timeout=60)


def client(url, state_root, runtime, data, name):
    return EdgeClient(url, create_token(state_root / "state", "device"), str(data), runtime=runtime,
                      max_memory=8 * MiB, state_dir=state_root / name, max_tasks=1)


@pytest.mark.timeout(300)
def test_ort_and_executorch_clients_are_aggregated_and_corrupt_bundles_refetched(federation, caplog):
    root, url, data = federation
    logs = {}
    for runtime, folder in (("ort", data[0]), ("executorch", data[1])):
        (entry,) = client(url, root, runtime, folder, runtime).run()
        logs[runtime] = entry
        assert (entry.runtime, entry.steps, entry.bundle_downloads, entry.outcome) == (runtime, 4, 1, "accepted")
        assert entry.tokens == 4 * 8 * 64
    s = fetch_status(url, create_token(root / "state", "admin"))
    assert s["version"] == 1 and s["buffered"] == 0  # K = 2: the ORT and ExecuTorch updates made version 1
    assert sorted(c["updates"] for c in s["clients"]) == [1, 1]
    assert logs["executorch"].base_version == 0  # both trained version 0 and were merged together

    # The cached ORT bundle is corrupted, then loses a file: each time the client refuses it
    # with the reason, downloads it again and trains.
    cached = root / "ort" / "bundles" / f"{PLAN.hash}-ort"
    with open(cached / "training_model.onnx", "r+b") as f:
        f.seek(64)
        f.write(b"corrupt!")
    caplog.clear()
    for damage, reason in ((None, "training_model.onnx fails its checksum"), ("checkpoint", "file checkpoint is missing")):
        if damage:
            (cached / damage).unlink()
        c = client(url, root, "ort", data[0], "ort")
        (entry,) = c.run()
        assert (entry.bundle_downloads, entry.outcome) == (1, "accepted")
        out = caplog.text  # the client logs through `logging`
        caplog.clear()
        assert "refused the cached bundle" in out and reason in out and "downloading it again" in out
    (entry,) = client(url, root, "ort", data[0], "ort").run()
    assert entry.bundle_downloads == 0  # a verified cached bundle is used as it is


def test_auto_declares_the_available_runtimes_fastest_first():
    assert declared_runtimes("auto", "device", False) == available_runtimes(False) == ("ort", "torch", "executorch")
    assert declared_runtimes("auto", "device", True) == ("torch", "ort", "executorch")
    assert declared_runtimes("auto", "gpu", False) == ("torch", "ort", "executorch")  # keeps AdamW state
    assert declared_runtimes("executorch", "device", False) == ("executorch",)


def test_scheduler_gives_the_first_declared_runtime():
    fed = load_config()
    sched = Scheduler(CFG, fed)
    for cid, runtimes in (("a", ("ort", "torch", "executorch")), ("b", ("executorch",)), ("c", ("tflite", "torch"))):
        sched.register(cid, Capabilities("device", 8 * MiB, 1e12, runtimes))
    assert {cid: sched.next_task(cid, 0, 0.0).runtime for cid in "abc"} == {"a": "ort", "b": "executorch", "c": "torch"}


def test_a_missing_or_unknown_runtime_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "executorch", None)  # as on a machine without the package
    monkeypatch.setitem(sys.modules, "executorch.extension.training", None)
    assert declared_runtimes("auto", "device", False) == ("ort", "torch")
    with pytest.raises(UserError, match="runtime 'executorch' is not installed on this machine"):
        EdgeClient("http://127.0.0.1:9", "t", "stdlib", runtime="executorch", state_dir=tmp_path).run()
    with pytest.raises(UserError, match="unknown runtime 'tflite'"):
        EdgeClient("http://127.0.0.1:9", "t", "stdlib", runtime="tflite", state_dir=tmp_path).run()
