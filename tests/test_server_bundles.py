"""The server publishes each tier plan's artifact bundle on first need, over a real server
process on loopback: concurrent first requests share one export, the files served verify
against the manifest (model, plan, runtime, checksums), ExecuTorch programs are traced at the
tier's batch x the federation's seq_len, access follows the weights' rules, and a published
bundle survives a restart -- re-exported only when it no longer verifies."""

import asyncio
import json
import re
import threading
import urllib.error
import urllib.request

import msgpack
import pytest

import federation_procs
from federation_procs import start_server
from stamen.core.model import PRESETS, ModelSpec
from stamen.core.plan import Plan, tier_plans
from stamen.mobile_bridge.manifest import read_bundle
from stamen.server.auth import create_token
from stamen.server.bundles import BundlePublisher
from stamen.server.coordinator import RequestError
from test_server_http import call

SPEC = ModelSpec("gpt-tiny")
PLANS = tier_plans(PRESETS["gpt-tiny"])
MiB = 2**20
# long_poll_s is a deadline, not a timing: the first requests wait for the server's real export,
# which took over 100 s beside the other worker's tests (pytest-xdist) on 2 cores loaded by others.
FED = """
[training]
seq_len = 32
[tiers.phone-high]
batch_size = 4
[server]
long_poll_s = 300.0
request_timeout_s = 360.0
"""
EXPORTED = re.compile(r"exported the (\w+) bundle of plan (\w+)")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    (root / "fed.toml").write_text(FED)
    return root


@pytest.fixture(scope="module")
def env(root):
    """A fresh export cache, so the first request really exports."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(federation_procs.ENV, "STAMEN_CACHE", str(root / "cache"))
        yield


def get(url, token=None):
    """(status, body): the listing unpacked, a file's bytes, an error's reason. Waits as long
    as the server may hold a request for an export in progress."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=400) as r:
            data = r.read()
            return r.status, msgpack.unpackb(data) if r.headers.get_content_type() == "application/msgpack" else data
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


def join(url, state):
    """A device's token and its plan: phone-high, the largest that 2.5 MiB fits at batch 4 x seq 32."""
    caps = {"role": "device", "memory_bytes": 5 * MiB // 2, "flops": 1e12, "runtimes": ["executorch"]}
    body = msgpack.packb({"join_token": create_token(state, "device"), "capabilities": caps})
    status, me = call(url + "/v1/join", "POST", body)
    assert status == 200, me
    return me["token"], Plan.from_dict(me["plan"])


def stop(proc) -> list[tuple[str, str]]:
    """Stop the server; the (runtime, plan) of every export it reported."""
    proc.terminate()
    out = proc.communicate(timeout=60)[0]
    return EXPORTED.findall(out)


def download(url, token, plan, runtime, dest):
    status, listing = get(f"{url}/v1/bundles/{plan}/{runtime}", token=token)
    assert status == 200, listing
    dest.mkdir(parents=True)
    for name in listing["files"]:
        status, data = get(f"{url}/v1/bundles/{plan}/{runtime}/{name}", token=token)
        assert status == 200
        (dest / name).write_bytes(data)
    return listing["files"]


@pytest.mark.timeout(900)
def test_bundles_published_once_verified_and_kept(root, env):
    state = root / "state"
    proc, url = start_server(state, root / "fed.toml")
    try:
        device, plan = join(url, state)
        assert plan == PLANS["phone-high"]
        plan = plan.hash
        answers = []

        def fetch():
            answers.append(get(f"{url}/v1/bundles/{plan}/executorch", token=device))

        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [a[0] for a in answers] == [200] * 4
        assert all(a[1] == answers[0][1] for a in answers)
        files = download(url, device, plan, "executorch", root / "got-et")
        manifest = read_bundle(root / "got-et", SPEC.hash, plan, "executorch")
        assert set(files) == set(manifest.files) | {"manifest.json"}
        assert [i["shape"] for i in manifest.inputs] == [[4, 32]] * 2  # the tier's batch x seq_len
        download(url, device, plan, "ort", root / "got-ort")
        read_bundle(root / "got-ort", SPEC.hash, plan, "ort")

        for path, status, reason in [
            (f"{PLANS['gpu'].hash}/ort", 403, "only its own plan"),
            (f"{plan}/tflite", 404, "no bundles for runtime 'tflite'"),
            ("0123456789abcdef/ort", 404, "unknown plan"),
            (f"{plan}/ort/nothing.bin", 404, "no file"),
            (f"{plan}/ort/.manifest.json", 400, "bad bundle path"),
        ]:
            got = get(f"{url}/v1/bundles/{path}", token=device)
            assert got[0] == status and reason in got[1], (path, got)
        assert get(f"{url}/v1/bundles/{plan}/ort")[0] == 401
    finally:
        exports = stop(proc)
    assert sorted(exports) == [("executorch", plan), ("ort", plan)]  # four concurrent requests, one export

    # A restart serves what was published without exporting; a bundle that no longer
    # verifies on disk is published again (from the export cache).
    (state / "bundles" / plan / "ort" / "checkpoint").write_bytes(b"corrupt")
    proc, url = start_server(state, root / "fed.toml")
    try:
        device, _ = join(url, state)
        download(url, device, plan, "executorch", root / "again-et")
        download(url, device, plan, "ort", root / "again-ort")
        read_bundle(root / "again-ort", SPEC.hash, plan, "ort")
    finally:
        exports = stop(proc)
    assert exports == [("ort", plan)]


def test_a_request_during_the_export_gets_503_and_the_export_goes_on(root, monkeypatch):
    """In-process publisher (a real export process): a caller that cannot wait is told to
    retry, without cancelling the export that the next caller then gets."""
    monkeypatch.setenv("STAMEN_CACHE", str(root / "inproc-cache"))
    tiers = {"a": (PLANS["phone-low"], 8), "b": (PLANS["phone-low"], 16)}  # one plan, two batch sizes

    async def scenario():
        pub = BundlePublisher(SPEC, tiers, 32, root / "inproc")
        with pytest.raises(RequestError, match="being exported: retry shortly") as e:
            await pub.get(PLANS["phone-low"].hash, "ort", 0.01)
        assert e.value.status == 503
        folder = await pub.get(PLANS["phone-low"].hash, "ort", 200)
        with pytest.raises(RequestError, match="one static shape") as e:
            await pub.get(PLANS["phone-low"].hash, "executorch", 200)
        assert e.value.status == 501
        pub.close()
        return folder

    folder = asyncio.run(scenario())
    assert folder == root / "inproc" / PLANS["phone-low"].hash / "ort"
    read_bundle(folder, SPEC.hash, PLANS["phone-low"].hash, "ort")
