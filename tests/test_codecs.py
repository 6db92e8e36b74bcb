"""Codecs: spec parsing, round trips within each codec's stated bound (hypothesis over names,
shapes, dtypes and every composition), top-k selection, and the downlink helpers.

Bounds are computed here from the codec definitions, not from the code under test:
fp16 rounds to 11 significant bits, bf16 to 8, blockwise int8/int4 to half a step of
absmax/127 or absmax/7 per block; top-k drops only entries no larger than any it keeps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stamen.compression.codecs import MalformedPayload, compress, decode, encode, reconstruct, select_topk, sparse
from stamen.compression.downlink import BaseMismatch, decode_download, encode_delta, encode_weights
from stamen.compression.spec import TopK, parse
from stamen.core.errors import UserError
from stamen.core.wire import Limits, ShapeMismatch, encode_frame

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative rounding of a float format (half an ulp) and the absolute floor of its subnormals.
ROUNDING = {"float32": (2.0**-24, 2.0**-150), "float16": (2.0**-11, 2.0**-25), "bfloat16": (2.0**-8, 2.0**-134)}
VALUES = ["fp32", "fp16", "bf16", "int8(block=4)", "int8(block=256)", "int4(block=2)", "int4(block=64)"]
CHAINS = [f"{top}{v}{z}" for top in ("", "topk(0.1)+", "topk(0.3, select=sample)+", "topk(0.3, chunk=5)+")
          for v in VALUES for z in ("", "+zstd(1)")]


@st.composite
def tensor_dicts(draw):
    names = draw(st.lists(st.text("abcxyz._0123456789", min_size=1, max_size=12), min_size=1, max_size=4, unique=True))
    out = {}
    for i, name in enumerate(names):
        shape = tuple(draw(st.lists(st.integers(0, 17), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        scale = draw(st.sampled_from([1e-4, 1.0, 300.0]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)) + i)
        out[name] = (torch.randn(shape, generator=g) * scale).to(DTYPES[dtype])
    return out


def value_bound(codec: str, x: np.ndarray) -> np.ndarray:
    """Per-element error bound of a value codec on the float32 values ``x``."""
    name = codec.split("(")[0]
    if name in ("fp32", "fp16", "bf16"):
        rel, floor = ROUNDING[{"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[name]]
        return np.abs(x) * rel + floor
    block, qmax = int(codec.split("=")[1].rstrip(")")), {"int8": 127, "int4": 7}[name]
    padded = np.concatenate([np.abs(x), np.zeros(-x.size % block, np.float32)]).reshape(-1, block)
    step = np.repeat(padded.max(axis=1), block)[: x.size] / qmax
    return step / 2 * (1 + 1e-4) + np.abs(x) * 1e-6


def check_within_bound(spec: str, tensors: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor]) -> None:
    s = parse(spec)
    frame = compress(tensors, s)
    for rec in frame.tensors:
        x = tensors[rec.name].float().reshape(-1).numpy()
        y = decoded[rec.name].float().reshape(-1).numpy()
        assert decoded[rec.name].dtype == tensors[rec.name].dtype
        assert decoded[rec.name].shape == tensors[rec.name].shape
        bound = np.abs(x).copy()  # a dropped entry loses all of itself
        if not sparse(s, rec.shape):  # dense codecs, and vectors under top-k
            bound = value_bound(str(s.values), x)
        else:
            kept = np.cumsum(rec.parts[0].astype(np.int64))
            chunk = s.topk.chunk or max(1, x.size)
            for start in range(0, x.size, chunk):  # within each chunk (the tensor, unchunked)
                inside = kept[(kept >= start) & (kept < start + chunk)]
                dropped = np.setdiff1d(np.arange(start, min(x.size, start + chunk)), inside)
                if s.topk.chunk is not None:
                    assert inside.size == min(chunk, max(1, round(s.topk.fraction * min(chunk, x.size - start))))
                if inside.size and dropped.size:
                    assert np.abs(x[dropped]).max() <= np.abs(x[inside]).min()
            bound[kept] = value_bound(str(s.values), x[kept])
        rel, floor = ROUNDING[str(tensors[rec.name].dtype).removeprefix("torch.")]
        bound = bound + (np.abs(x) + bound) * rel + floor  # the cast back to the tensor's dtype
        assert np.all(np.abs(y - x) <= bound), (spec, rec.name, np.max(np.abs(y - x) - bound))


def one_by_one(frame) -> dict[str, np.ndarray]:
    """The decoder as first written: each tensor on its own (indices by a cumulative sum of
    its gaps, values dequantized per tensor, scattered into zeros). The one-pass decoder
    must give exactly these floats."""
    s = parse(frame.codec)
    v = s.values
    out = {}
    for rec in frame.tensors:
        parts = rec.parts
        idx = np.arange(rec.numel) if not sparse(s, rec.shape) else np.cumsum(parts[0].astype(np.int64))
        if sparse(s, rec.shape):
            parts = parts[1:]
        if v.name == "fp32":
            vals = parts[0]
        elif v.name == "fp16":
            vals = torch.from_numpy(parts[0].copy()).float().numpy()
        elif v.name == "bf16":
            vals = (parts[0].astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            q, scale = parts
            if v.name == "int4":
                q = np.stack((q & np.uint8(15), q >> np.uint8(4)), axis=1).view(np.int8) - np.int8(8)
            vals = np.multiply(q.reshape(-1, v.block), scale[:, None], dtype=np.float32).reshape(-1)[:idx.size]
        x = np.zeros(rec.numel, np.float32)
        x[idx] = vals
        out[rec.name] = x
    return out


@settings(max_examples=80, deadline=None)
@given(tensor_dicts(), st.sampled_from(CHAINS))
def test_one_pass_decode_equals_decoding_each_tensor_alone(tensors, spec):
    frame = compress(tensors, spec)
    got = reconstruct(frame)
    for name, want in one_by_one(frame).items():
        assert np.array_equal(got[name].reshape(-1).numpy(), want, equal_nan=True)


@settings(max_examples=60, deadline=None)
@given(tensor_dicts(), st.sampled_from(CHAINS))
def test_round_trip_within_bound(tensors, spec):
    payload = decode(encode(tensors, spec))
    assert payload.codec == str(parse(spec))
    assert list(payload.tensors) == list(tensors)
    check_within_bound(spec, tensors, payload.tensors)


@settings(max_examples=40, deadline=None)
@given(tensor_dicts(), st.sampled_from(["fp32", "fp32+zstd(1)", "fp32+zstd(9)"]))
def test_fp32_is_lossless_for_every_dtype(tensors, spec):
    out = decode(encode(tensors, spec)).tensors
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)


@pytest.mark.parametrize("dtype,spec", [(torch.float16, "fp16+zstd(2)"), (torch.bfloat16, "bf16")])
def test_narrow_codecs_are_lossless_for_their_own_dtype(dtype, spec):
    t = (torch.randn(3, 300, generator=torch.Generator().manual_seed(1)) * 10).to(dtype)
    assert torch.equal(decode(encode({"w": t}, spec)).tensors["w"], t)


def test_fp16_saturates_instead_of_overflowing():
    t = torch.tensor([1e6, -1e6, 3.0])
    out = decode(encode({"w": t}, "fp16")).tensors["w"]
    assert out.tolist() == [65504.0, -65504.0, 3.0]


def test_int8_exact_numbers():
    """Hand-computed: block [1, -2, 0.5, 4] has scale 4/127; each value rounds to q·scale."""
    t = torch.tensor([1.0, -2.0, 0.5, 4.0, 0.0, 0.0])
    out = decode(encode({"w": t}, "int8(block=4)")).tensors["w"]
    scale = np.float32(4.0) / np.float32(127)
    expect = np.rint(np.array([1.0, -2.0, 0.5, 4.0], np.float32) / scale) * scale
    assert np.allclose(out[:4].numpy(), expect, rtol=1e-6, atol=0) and out[4:].tolist() == [0.0, 0.0]


def test_int4_packs_two_values_per_byte():
    t = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    rec = compress({"w": t}, "int4(block=64)").tensors[0]
    assert rec.part_dtypes == ["uint8", "float32"] and rec.parts[0].size == 2048 and rec.parts[1].size == 64


def test_topk_keeps_exactly_k_and_delta_codes_indices():
    t = torch.tensor([[0.1, -5.0, 0.2, 3.0], [-0.3, 0.0, 4.0, 0.05]])
    rec = compress({"w": t}, "topk(0.375)").tensors[0]  # k = 3 of 8
    assert rec.part_dtypes[0] == "uint8" and rec.parts[0].tolist() == [1, 2, 3]  # indices 1, 3, 6
    assert decode(encode({"w": t}, "topk(0.375)")).tensors["w"].tolist() == [[0, -5.0, 0, 3.0], [0, 0, 4.0, 0]]


def test_topk_sends_vectors_whole():
    """Norm gains and biases go through the value codec only: every element arrives."""
    t = {"ln.weight": torch.tensor([0.1, -5.0, 0.2, 3.0]), "w": torch.tensor([[0.1, -5.0], [0.2, 3.0]])}
    frame = compress(t, "topk(0.25)+fp32")
    assert [len(r.parts) for r in frame.tensors] == [1, 2]
    out = decode(encode(t, "topk(0.25)+fp32")).tensors
    assert torch.equal(out["ln.weight"], t["ln.weight"]) and out["w"].tolist() == [[0, -5.0], [0, 0]]


def test_topk_index_dtype_widens_with_the_largest_gap():
    t = torch.zeros(200_000)
    t[[3, 70_000, 199_999]] = torch.tensor([1.0, 2.0, 3.0])
    rec = compress({"w": t.view(1, -1)}, "topk(0.000015)").tensors[0]
    assert rec.part_dtypes[0] == "uint32" and np.cumsum(rec.parts[0]).tolist() == [3, 70_000, 199_999]


@pytest.mark.parametrize("select", ["exact", "sample"])
def test_topk_selection_on_a_large_tensor(select):
    x = np.random.default_rng(3).standard_normal(1_000_000).astype(np.float32)
    idx = select_topk(x, TopK(0.02, select, seed=5))
    mag = np.abs(x)
    reference = np.sort(np.argsort(-mag, kind="stable")[:20_000])
    if select == "exact":
        assert np.array_equal(idx, reference)
    else:  # a cut at the sampled quantile: about k entries, each larger than all it drops
        assert 18_000 <= idx.size <= 22_000
        assert np.all(np.diff(idx) > 0)
        mask = np.zeros(x.size, bool)
        mask[idx] = True
        assert mag[~mask].max() <= mag[mask].min()


def test_chunked_topk_keeps_each_chunks_own_maxima():
    """Reference: a Python loop sorting each chunk of 100 by magnitude; 0.05 of 100 is 5 per
    chunk and the 37-element tail keeps round(1.85) = 2. The largest values sit in one chunk,
    which a whole-tensor top-k would spend all its picks on."""
    g = np.random.default_rng(7)
    x = g.standard_normal(1037).astype(np.float32)
    x[200:300] *= 1000
    idx = select_topk(x, TopK(0.05, chunk=100))
    reference = np.concatenate([start + np.sort(np.argsort(-np.abs(x[start:start + 100]), kind="stable")[:5 if start < 1000 else 2])
                                for start in range(0, 1037, 100)])
    assert np.array_equal(idx, reference) and idx.size == 10 * 5 + 2
    w = torch.from_numpy(x).view(1, -1)
    rec = compress({"w": w}, "topk(0.05, chunk=100)+fp32").tensors[0]
    assert rec.part_dtypes[0] == "uint8"  # gaps stay below 2 * chunk
    out = decode(encode({"w": w}, "topk(0.05, chunk=100)")).tensors["w"].numpy().reshape(-1)
    assert np.array_equal(np.flatnonzero(out), reference) and np.array_equal(out[reference], x[reference])


def test_reconstruct_matches_decoded_bytes():
    t = {"a": torch.randn(10, 100, generator=torch.Generator().manual_seed(2))}
    frame = compress(t, "topk(0.1)+int4(block=16)")
    assert torch.equal(reconstruct(frame)["a"], decode(encode(t, "topk(0.1)+int4(block=16)+zstd(3)")).tensors["a"])


def test_payload_self_describes():
    t = {"blocks.0.attn.c_attn.weight": torch.zeros(6, 4, dtype=torch.bfloat16)}
    p = decode(encode(t, "int8(block=8)+zstd(1)", kind="update", meta={"task": "t1"}))
    assert (p.kind, p.codec, p.meta) == ("update", "int8(block=8)+zstd(1)", {"task": "t1"})
    assert p.tensors["blocks.0.attn.c_attn.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("spec,canonical", [
    ("int8(block=256)+zstd(3)", "int8(block=256)+zstd(3)"),
    ("topk(0.02)+int4+zstd(1)", "topk(0.02)+int4(block=256)+zstd(1)"),
    (" topk( 0.02 , select=sample ) + int8(64) ", "topk(0.02, select=sample, seed=0)+int8(block=64)"),
    ("zstd", "fp32+zstd(3)"),
    ("bf16", "bf16"),
    ("topk(0.02,chunk=4096)+int4", "topk(0.02, chunk=4096)+int4(block=256)"),
])
def test_spec_canonical_form(spec, canonical):
    assert str(parse(spec)) == canonical and str(parse(canonical)) == canonical


@pytest.mark.parametrize("spec,words", [
    ("", "empty"), ("int9", "unknown codec stage 'int9'"), ("int8+topk(0.1)", "first"),
    ("int8+fp16", "one value codec"), ("zstd+int8", "one value codec"), ("zstd(1)+zstd(2)", "twice"),
    ("topk", "needs a fraction"), ("topk(2)", "outside"), ("topk(0.1, select=fast)", "select must"),
    ("topk(0.1, chunk=0)", "outside"), ("topk(0.1, select=sample, chunk=64)", "always exact"),
    ("int8(block=abc)", "not an integer"), ("int8(size=4)", "unknown argument 'size'"),
    ("int4(block=5)", "even"), ("zstd(99)", "outside"), ("int8(block=4", "cannot parse"),
    ("fp16(3)", "at most 0"), ("int8(block=4, 8)", "positional argument after"),
])
def test_bad_spec_is_a_one_line_user_error(spec, words):
    with pytest.raises(UserError, match=words) as e:
        parse(spec)
    assert "\n" not in str(e.value)


def test_bad_input_dtype_is_a_user_error():
    with pytest.raises(UserError, match="int64"):
        encode({"w": torch.arange(4)}, "fp32")


def test_downlink_weights_and_delta():
    g = torch.Generator().manual_seed(4)
    base = {"a": torch.randn(64, 8, generator=g), "b": torch.randn(8, generator=g)}
    target = {n: t + 1e-3 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    version, w = decode_download(encode_weights(target, 7))  # the federation's codec: exact
    assert version == 7 and all(torch.equal(w[n], target[n]) for n in target)
    version, w = decode_download(encode_weights(target, 7, spec="fp16+zstd(1)"))
    assert version == 7 and all(torch.allclose(w[n], target[n], rtol=2**-11, atol=2**-25) for n in target)
    data = encode_delta(base, target, base_version=5, version=7, spec="fp16+zstd(1)")
    version, w = decode_download(data, base=base, base_version=5)
    for n in target:  # the fp16 rounding applies to the small delta, not to the weights
        assert version == 7 and (w[n] - target[n]).abs().max() <= 1e-3 * 5 * 2**-11 + 1e-6
    with pytest.raises(BaseMismatch):
        decode_download(data, base=base, base_version=4)
    with pytest.raises(ShapeMismatch):
        decode_download(data, Limits(manifest={"a": (8, 64), "b": (8,)}), base=base, base_version=5)


def test_delta_to_a_plan_slice_keeps_other_base_tensors():
    base = {"a": torch.zeros(4), "b": torch.ones(2, dtype=torch.bfloat16)}
    data = encode_delta({"a": base["a"]}, {"a": torch.full((4,), 0.5)}, 1, 2, spec="fp32")
    _, w = decode_download(data, base=base, base_version=1)
    assert w["a"].tolist() == [0.5] * 4 and w["b"] is base["b"]
    assert math.isclose(float(w["a"].sum()), 2.0)


def test_frames_sharing_a_table_are_each_checked():
    """Frames that declare the same tensor table share its checks and scatter arrays
    (``_layout``); the values are still judged frame by frame: a top-k frame whose indices
    repeat or run past the tensor is refused after a good frame of the same table was
    decoded, and a good one decodes exactly after it."""
    g = torch.Generator().manual_seed(3)
    t = {"w": torch.randn(8, 50, generator=g), "b": torch.randn(50, generator=g)}
    good = compress(t, "topk(0.1)+int8")
    want = reconstruct(good)
    limits = Limits(manifest={n: tuple(x.shape) for n, x in t.items()})
    for broken in ("repeat", "past"):
        frame = compress(t, "topk(0.1)+int8")
        gaps = frame.tensors[0].parts[0]
        if broken == "repeat":
            gaps[1] = 0  # the second index equals the first
        else:
            gaps[-1] = 255  # the last index lands past the tensor's 400 elements
        bad = encode_frame(frame, None)
        assert torch.equal(decode(encode_frame(good, None), limits).tensors["w"], want["w"])
        with pytest.raises(MalformedPayload, match="topk indices"):
            decode(bad, limits)
    again = decode(encode_frame(good, None), limits).tensors
    assert all(torch.equal(again[n], want[n]) for n in t)
