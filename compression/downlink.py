"""What the server sends down: a plan's weights of version v or, to a client that already
holds version b, the change from b to v, which zstd shrinks far below the weights once frozen
and unchanged tensors dominate.

``core.wire.WEIGHTS_CODEC`` is the federation's one weights codec, lossless: a client computes its
pseudo-gradient Δ = θ_base − θ_local against the weights it was sent, and the aggregator
applies Δ to the server's exact θ_base, so any rounding on the way down would enter every
update as error. The lossy value codecs (fp16/bf16 halve the bytes) stay available through
``spec`` for a caller that accepts the drift; a client chaining many lossy deltas accumulates
their rounding.
"""

from __future__ import annotations

import torch

from stamen.compression.codecs import MalformedPayload, decode, encode
from stamen.core.wire import WEIGHTS_CODEC, Limits, WireError



class BaseMismatch(WireError):
    """A delta was built on a version the client does not hold."""


def encode_weights(weights: dict[str, torch.Tensor], version: int, spec: str = WEIGHTS_CODEC) -> bytes:
    return encode(weights, spec, kind="weights", meta={"version": version})


def encode_delta(base: dict[str, torch.Tensor], target: dict[str, torch.Tensor], base_version: int,
                 version: int, spec: str = WEIGHTS_CODEC) -> bytes:
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
