"""The bundle format: export_bundle writes a verifiable folder through the export cache, and
a corrupt, incomplete or mismatched bundle is refused with a reason (acceptance 4, reader
side)."""

import json
import math

import pytest

from stamen.core.model import ModelSpec
from stamen.core.errors import UserError
from stamen.core.plan import Plan
from stamen.edge_client.ort_runtime import OrtRuntime
from stamen.mobile_bridge.bundle import cached_bundle, export_bundle
from stamen.mobile_bridge.manifest import MANIFEST, BundleError, read_bundle, sha256_file

SPEC = ModelSpec("gpt-tiny")
PLAN = Plan("last", (3,), 1.0, ("blocks.3.*",))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def bundle(cache, tmp_path):
    return export_bundle(SPEC, PLAN, "ort", tmp_path / "b", cache_dir=cache)


def test_manifest_describes_the_bundle(bundle):
    m = read_bundle(bundle, SPEC.hash, PLAN.hash, "ort")
    assert (m.spec_name, m.plan, m.runtime) == ("gpt-tiny", PLAN.to_dict(), "ort")
    assert set(m.files) == {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"}
    for name, entry in m.files.items():
        assert entry["sha256"] == sha256_file(bundle / name)
    cfg = SPEC.gpt_config()
    assert {s.name: s.shape for s in m.params} == PLAN.shapes(cfg)
    assert [s.name for s in m.trainable()] == sorted(PLAN.trainable(cfg), key=[s.name for s in m.params].index)
    offsets = [s.offset for s in m.params]
    assert offsets == sorted(offsets) and all(s.nbytes == 4 * math.prod(s.shape) for s in m.params)


def test_export_reuses_the_cache(cache, tmp_path):
    first = cached_bundle(SPEC, PLAN, "ort", cache_dir=cache)
    stamp = (first / MANIFEST).stat().st_mtime_ns
    export_bundle(SPEC, PLAN, "ort", tmp_path / "again", cache_dir=cache)
    assert (first / MANIFEST).stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [first.name]


def test_corrupt_cache_entry_is_exported_again(cache):
    first = cached_bundle(SPEC, PLAN, "ort", cache_dir=cache)
    with open(first / "checkpoint", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    again = cached_bundle(SPEC, PLAN, "ort", cache_dir=cache)
    assert again == first
    read_bundle(again, SPEC.hash, PLAN.hash, "ort")


def test_checksum_mismatch_is_refused(bundle):
    with open(bundle / "training_model.onnx", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match="training_model.onnx fails its checksum"):
        OrtRuntime(bundle)


def test_missing_file_is_refused(bundle):
    (bundle / "checkpoint").unlink()
    with pytest.raises(BundleError, match="file checkpoint is missing"):
        read_bundle(bundle)


def test_bundle_for_another_plan_is_refused(bundle):
    other = Plan("other", (2,), 1.0, ("blocks.2.*",))
    with pytest.raises(BundleError, match=f"for plan {PLAN.hash}, not {other.hash}"):
        OrtRuntime(bundle, SPEC.hash, other.hash)
    with pytest.raises(BundleError, match="for runtime ort, not executorch"):
        read_bundle(bundle, runtime="executorch")


def test_garbled_manifest_and_bad_names(bundle, tmp_path):
    (bundle / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not a valid manifest"):
        read_bundle(bundle)
    with pytest.raises(BundleError, match="no manifest.json"):
        read_bundle(tmp_path)
    with pytest.raises(UserError, match="unknown runtime"):
        export_bundle(SPEC, PLAN, "tflite", tmp_path / "x")


def test_manifest_file_names_stay_inside_the_bundle(bundle):
    m = json.loads((bundle / MANIFEST).read_text())
    m["files"]["../escape"] = m["files"].pop("checkpoint")
    (bundle / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="leaves the bundle folder"):
        read_bundle(bundle)


def test_weights_for_another_plan_are_refused(bundle):
    rt = OrtRuntime(bundle)
    cfg = SPEC.gpt_config()
    wrong = Plan("w", (3,), 0.5, ("*",)).build(cfg)
    with pytest.raises(BundleError, match="shape"):
        rt.set_weights({n: p.detach() for n, p in wrong.named_parameters()})
    with pytest.raises(BundleError, match="missing"):
        rt.set_weights({})


def test_available_runtimes_prefer_ort_on_cpu_and_torch_on_cuda():
    from stamen.edge_client.bundle_runtime import available_runtimes

    assert available_runtimes(cuda=False) == ("ort", "torch", "executorch")  # all installed here
    assert available_runtimes(cuda=True) == ("torch", "ort", "executorch")
