"""Update and download compression: codecs over named tensors, composed by a spec string
(``topk(0.02)+int4+zstd(1)``), error feedback kept per plan, and downlink helpers."""

from stamen.compression.codecs import Payload, decode, encode
from stamen.compression.downlink import decode_download, encode_delta, encode_weights
from stamen.compression.feedback import ErrorFeedback
from stamen.compression.spec import CodecSpec, parse

__all__ = ["CodecSpec", "ErrorFeedback", "Payload", "decode", "decode_download", "encode",
           "encode_delta", "encode_weights", "parse"]
