"""Pretrained causal LMs in Hugging Face's folder format (``config.json`` + safetensors +
tokenizer files), named ``hf:PATH``.

Nothing is downloaded: ``transformers`` reads the folder with ``local_files_only``. The model is
wrapped in ``CausalLM`` so it speaks stamen's training interface (``model(idx, targets)`` returns
logits and the mean cross-entropy over targets that are not ``IGNORE``), which is what lets the one
training loop (``core.train``) fine-tune it. ``transformers`` is imported lazily: the rest of stamen
runs without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from stamen.core.errors import UserError

PREFIX = "hf:"
IGNORE = -100  # a target that carries no loss (prompt tokens in instruction tuning); torch's default


def is_hf(name: str) -> bool:
    return name.startswith(PREFIX)


def hf_folder(name: str) -> Path:
    """The folder an ``hf:PATH`` name points at, checked to hold a model config."""
    path = Path(name[len(PREFIX):] if is_hf(name) else name).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


def speaks_bytes(folder: Path) -> bool:
    """Whether a model folder is a stamen one, which encodes bytes and has no tokenizer
    (``core.gpt2`` writes ``"tokenizer": "bytes"`` into its config)."""
    return json.loads((folder / "config.json").read_text()).get("stamen", {}).get("tokenizer") == "bytes"


def load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the model config in {path}: {e}") from None


class CausalLM(nn.Module):
    """A Hugging Face causal LM behind stamen's interface. ``targets`` are already shifted
    (``targets[:, t]`` is the token after ``idx[:, t]``), as stamen's batch streams make them."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.hf(input_ids=idx, use_cache=False).logits
        if targets is None:
            return logits
        return logits, lm_loss(logits.float(), targets)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not ``IGNORE``; 0 (with a zero gradient)
    when none is, as for a batch of instructions whose prompts fill the whole window: such a
    batch trains nothing, where the plain mean over no targets is NaN and poisons the weights."""
    flat = targets.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), flat, ignore_index=IGNORE, reduction="sum")
    return loss / (flat != IGNORE).sum().clamp(min=1)


def build_hf(path: Path, weights: bool = True) -> CausalLM:
    """The model in ``path``; with ``weights=False``, its architecture on the meta device (shapes
    for plans and memory estimates, no memory and no weight file read)."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(path)
    if not weights:
        with torch.device("meta"):
            return CausalLM(AutoModelForCausalLM.from_config(cfg))
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model in {path}: {e}") from None
    return CausalLM(hf)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in {path}: {e}") from None


def byte_tokenizer():
    """A byte-level tokenizer with stamen's vocabulary (token i is byte i) plus an end-of-text
    token 256, as a ``PreTrainedTokenizerFast`` that ``save_pretrained`` writes in the standard
    format. Built from the ``tokenizers`` library alone: no vocabulary file to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (the ByteLevel pre-tokenizer's)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = dict(zip(keep, map(chr, keep))), 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def folder_hash(path: Path) -> str:
    """Names an ``hf:`` base for checkpoints and artifacts: the config and the full contents of
    its weight files (read in 1 MiB chunks), so two folders of the same architecture with
    different weights never share artifacts."""
    h = hashlib.sha256(json.dumps(json.loads((path / "config.json").read_text()), sort_keys=True).encode())
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]
