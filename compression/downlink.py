"""What the server sends down: weights (fp16/bf16 + zstd halve or better the bytes of fp32) or,
to a client that already holds version b, the compressed change from b to v, which is far
smaller than the weights once training has settled.

A delta is taken from the server's exact version b; the client adds it to its own copy of b.
A client that chains many lossy deltas accumulates their rounding, so a server sends full
weights now and then (the scheduler's call) and uses a lossless codec where that matters.
"""

from __future__ import annotations

import torch

from stamen.compression.codecs import MalformedPayload, decode, encode
from stamen.core.wire import Limits, WireError

DEFAULT_SPEC = "fp16+zstd(1)"


class BaseMismatch(WireError):
    """A delta was built on a version the client does not hold."""


def encode_weights(weights: dict[str, torch.Tensor], version: int, spec: str = DEFAULT_SPEC) -> bytes:
    return encode(weights, spec, kind="weights", meta={"version": version})


def encode_delta(base: dict[str, torch.Tensor], target: dict[str, torch.Tensor], base_version: int,
                 version: int, spec: str = DEFAULT_SPEC) -> bytes:
    """The change ``target − base`` (computed in float32) as a payload a holder of base applies."""
    delta = {n: target[n].float() - base[n].float() for n in target}
    return encode(delta, spec, kind="delta", meta={"base_version": base_version, "version": version})


def decode_download(data: bytes, limits: Limits = Limits(), base: dict[str, torch.Tensor] | None = None,
                    base_version: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    """(version, weights) from a weights or delta payload. A delta needs the ``base`` it was
    built on; tensors it does not name keep their base values, and each keeps its dtype."""
    p = decode(data, limits)
    version = p.meta.get("version")
    if not isinstance(version, int):
        raise MalformedPayload("download payload without an integer version")
    if p.kind == "weights":
        return version, p.tensors
    if p.kind != "delta":
        raise MalformedPayload(f"download payload of kind {p.kind!r}, expected weights or delta")
    if base is None or p.meta.get("base_version") != base_version:
        raise BaseMismatch(f"delta from version {p.meta.get('base_version')}, the client holds {base_version}")
    wrong = [n for n, d in p.tensors.items() if n not in base or base[n].shape != d.shape]
    if wrong:
        raise BaseMismatch(f"delta tensor {wrong[0]!r} is not in the base or has another shape")
    out = dict(base)
    for n, d in p.tensors.items():
        out[n] = (base[n].float() + d.float()).to(base[n].dtype)
    return version, out
