"""Bounded decoding: every hostile or broken frame raises its own WireError subclass, before
allocating more than the limits allow. Hostile frames are built by hand with msgpack and
zstandard here, not with the encoder under test."""

from __future__ import annotations

import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
import zstandard

from stamen.compression.codecs import BadCodec, MalformedPayload, decode, encode
from stamen.core import wire
from stamen.core.errors import UserError
from stamen.core.wire import Limits

pytestmark = pytest.mark.timeout(60)


def frame(body: bytes = b"", zstd: bool = False, body_bytes: int | None = None, **header) -> bytes:
    """A frame from parts: one float32 tensor "w" of 4 elements unless ``header`` says otherwise."""
    h = {"format": 1, "kind": "update", "codec": "fp32", "meta": {},
         "tensors": [["w", "float32", [4], [["float32", 4]]]], "zstd": zstd,
         "body_bytes": len(body) if body_bytes is None else body_bytes}
    h.update(header)
    return msgpack.packb(h) + body


GOOD_BODY = np.arange(4, dtype=np.float32).tobytes()


def test_hand_built_frame_decodes():
    assert decode(frame(GOOD_BODY)).tensors["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_every_error_is_a_user_error():
    assert issubclass(wire.WireError, UserError)
    for cls in (wire.FrameTooLarge, wire.DecompressedTooLarge, wire.TooManyTensors, wire.TooManyElements,
                wire.TooDeep, wire.LengthLimit, wire.TruncatedFrame, wire.MalformedFrame,
                wire.UnsupportedVersion, wire.BadDtype, wire.NameMismatch, wire.ShapeMismatch,
                wire.NonFinite, wire.NormTooLarge, BadCodec, MalformedPayload):
        assert issubclass(cls, wire.WireError)


def test_zstd_bomb_stops_at_the_declared_size():
    """256 MiB of zeros compress to a few KiB; the header declares 16 bytes. The decoder must
    fail having allocated about the declared size, not the bomb's."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(1 << 20)
    bomb = b"".join([compressor.compress(zeros) for _ in range(256)] + [compressor.flush()])
    assert len(bomb) < 64 << 10
    data = frame(bomb, zstd=True)
    tracemalloc.start()
    with pytest.raises(wire.DecompressedTooLarge, match="zstd bomb"):
        decode(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_declared_size_over_the_limit_is_refused_before_decompressing():
    big = [["w", "float32", [1 << 28], [["float32", 1 << 28]]]]
    with pytest.raises(wire.DecompressedTooLarge, match="max_decompressed_bytes"):
        decode(frame(b"\x00", zstd=True, tensors=big), Limits(max_decompressed_bytes=1 << 20))


def test_every_truncation_of_a_frame_is_caught():
    for spec in ("fp32", "int8(block=4)+zstd(1)"):
        data = encode({"w": torch.arange(10.0), "v": torch.ones(3)}, spec)
        for cut in range(len(data)):
            with pytest.raises(wire.TruncatedFrame):
                decode(data[:cut])


def test_trailing_bytes_and_corrupt_zstd_are_malformed():
    with pytest.raises(wire.MalformedFrame, match="trailing"):
        decode(frame(GOOD_BODY, body_bytes=8))
    with pytest.raises(wire.MalformedFrame, match="zstd"):
        decode(frame(b"not a zstd frame at all", zstd=True))
    with pytest.raises(wire.MalformedFrame, match="not msgpack"):
        decode(b"\xc1" + GOOD_BODY)
    with pytest.raises(wire.MalformedFrame, match="keys"):
        decode(msgpack.packb({"format": 1}))


def test_a_known_table_changes_no_verdict(monkeypatch):
    """A frame whose tensor entries are a table checked before skips their unpack
    (``wire._known_table``); every other part is checked as ever, with the same error as for a
    table seen for the first time, and a good frame decodes to the same values."""
    nested = 1
    for _ in range(20):
        nested = [nested]
    data = encode({"w": torch.arange(10.0), "v": torch.ones(3)}, "int8(block=4)+zstd(1)")
    head, n = msgpack.Unpacker(), len(data)
    head.feed(data)
    header = head.unpack()
    body = data[head.tell():]

    def variant(**changes) -> bytes:
        return msgpack.packb({**header, **changes}) + body

    frames = [data, data + b"x", data[:-1], variant(format=2), variant(kind=3), variant(meta={"x": nested}),
              variant(meta={"x": list(range(101))}), variant(body_bytes=n), msgpack.packb({**header, "extra": 1}) + body,
              msgpack.packb({**header, "zstd": None}) + body, variant(codec="nope")]

    def verdicts(limits: Limits) -> list:
        out = []
        for f in frames:
            try:
                out.append({k: t.tolist() for k, t in decode(f, limits).tensors.items()})
            except wire.WireError as e:
                out.append((type(e), str(e)))
        return out

    for limits in (Limits(), Limits(max_len=100)):
        decode(data, limits)  # the table is known from here on
        known = verdicts(limits)
        monkeypatch.setattr(wire, "_tables", {})
        monkeypatch.setattr(wire, "_known_table", lambda data, limits: None)
        assert verdicts(limits) == known
        monkeypatch.undo()
    assert isinstance(known[0], dict) and all(isinstance(v, tuple) for v in known[1:])


def test_wrong_format_version():
    with pytest.raises(wire.UnsupportedVersion, match="format version 2"):
        decode(frame(GOOD_BODY, format=2))


def test_msgpack_nesting_bombs():
    with pytest.raises(wire.TooDeep):  # deeper than msgpack's own stack
        decode(b"\x91" * 100_000 + b"\xc0")
    nested = 1
    for _ in range(20):
        nested = [nested]
    with pytest.raises(wire.TooDeep, match="max_depth=6"):
        decode(frame(GOOD_BODY, meta={"x": nested}))


def test_msgpack_length_limit():
    with pytest.raises(wire.LengthLimit, match="max_len=100"):
        decode(frame(GOOD_BODY, meta={"x": list(range(101))}), Limits(max_len=100))


def test_too_many_tensors_and_elements():
    many = [[f"t{i}", "float32", [1], [["float32", 1]]] for i in range(5)]
    with pytest.raises(wire.TooManyTensors, match="max_tensors=4"):
        decode(frame(bytes(40), tensors=many), Limits(max_tensors=4))
    huge = [["w", "float32", [1 << 20, 1 << 20], []]]
    with pytest.raises(wire.TooManyElements, match="max_elements"):
        decode(frame(tensors=huge))


def test_frame_too_large():
    with pytest.raises(wire.FrameTooLarge, match="max_compressed_bytes=10"):
        decode(frame(GOOD_BODY), Limits(max_compressed_bytes=10))


def test_nan_and_inf_payloads():
    for spec in ("fp32", "fp16+zstd(1)", "int8(block=4)", "topk(0.5)+fp32"):
        with pytest.raises(wire.NonFinite, match="'w'"):
            decode(encode({"w": torch.tensor([1.0, float("nan"), 2.0, 3.0])}, spec))
    with pytest.raises(wire.NonFinite):
        decode(frame(np.array([1, np.inf, 0, 0], np.float32).tobytes()))
    inf = decode(frame(np.array([1, np.inf, 0, 0], np.float32).tobytes()), Limits(finite=False))
    assert inf.tensors["w"][1].item() == float("inf")


def test_norm_bound():
    data = encode({"a": torch.full((4,), 3.0), "b": torch.full((1,), 4.0)}, "fp32")  # norm sqrt(52)
    assert decode(data, Limits(max_norm=7.3)).tensors["b"].item() == 4.0
    with pytest.raises(wire.NormTooLarge, match="7.211"):
        decode(data, Limits(max_norm=7.2))


def test_manifest_names_and_shapes():
    data = encode({"w": torch.zeros(2, 3), "b": torch.zeros(3)}, "int8(block=4)+zstd(1)")
    assert set(decode(data, Limits(manifest={"w": (2, 3), "b": (3,)})).tensors) == {"w", "b"}
    with pytest.raises(wire.ShapeMismatch, match=r"'w' has shape \[2, 3\], the manifest says \[3, 2\]"):
        decode(data, Limits(manifest={"w": (3, 2), "b": (3,)}))
    with pytest.raises(wire.NameMismatch, match="missing \\['c'\\], unexpected \\['b'\\]"):
        decode(data, Limits(manifest={"w": (2, 3), "c": (3,)}))


def test_dtype_whitelists():
    with pytest.raises(wire.BadDtype, match="'int64'"):
        decode(frame(GOOD_BODY, tensors=[["w", "int64", [4], [["float32", 4]]]]))
    with pytest.raises(wire.BadDtype, match="'float64'"):
        decode(frame(bytes(32), tensors=[["w", "float32", [4], [["float64", 4]]]]))
    with pytest.raises(wire.BadDtype):
        decode(encode({"w": torch.zeros(4, dtype=torch.float16)}, "fp32"), Limits(dtypes=frozenset({"float32"})))


def test_malformed_entries():
    for bad in (["w", "float32", [4]], ["w", "float32", [-4], []], [1, "float32", [4], []], "w"):
        with pytest.raises(wire.MalformedFrame, match="bad tensor entry"):
            decode(frame(GOOD_BODY, tensors=[bad]))
    twice = [["w", "float32", [4], [["float32", 4]]]] * 2
    with pytest.raises(wire.MalformedFrame, match="twice"):
        decode(frame(GOOD_BODY * 2, tensors=twice))


def test_parts_that_do_not_fit_the_codec():
    with pytest.raises(MalformedPayload, match="expected"):  # int8 needs int8 values and scales
        decode(frame(GOOD_BODY, codec="int8(block=4)"))
    topk = [["w", "float32", [2, 2], [["uint8", 2], ["float32", 2]]]]
    past_end = np.array([1, 3], np.uint8).tobytes() + bytes(6) + np.ones(2, np.float32).tobytes()
    with pytest.raises(MalformedPayload, match="run past"):
        decode(frame(past_end, codec="topk(0.5)+fp32", tensors=topk))
    repeated = np.array([1, 0], np.uint8).tobytes() + bytes(6) + np.ones(2, np.float32).tobytes()
    with pytest.raises(MalformedPayload, match="repeat"):
        decode(frame(repeated, codec="topk(0.5)+fp32", tensors=topk))
    with pytest.raises(BadCodec, match="'int9'"):
        decode(frame(GOOD_BODY, codec="int9"))


def test_a_nesting_bomb_inside_a_tensor_entry_is_too_deep():
    nested = 1
    for _ in range(900):
        nested = [nested]
    with pytest.raises(wire.TooDeep, match="max_depth=6"):
        decode(frame(GOOD_BODY, tensors=[["w", "float32", [nested], [["float32", 4]]]]))
