"""Models out: stamen weights as a standard model folder, and back.

A folder holds ``config.json`` and ``model.safetensors``. For stamen's GPT the folder *is* a
Hugging Face GPT-2 checkpoint (``GPT2LMHeadModel``): stamen's GPT is GPT-2's architecture
(pre-LayerNorm blocks, tanh-GELU MLP, learned positions, biases, eps 1e-5) under other tensor
names, and GPT-2 keeps its projections in ``Conv1D`` layers that store the transpose of an
``nn.Linear`` weight. So the mapping is a renaming plus a transpose of the four projection
matrices per block, and ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` computes
the same logits as stamen's model (a test holds the two to each other). Nothing here imports
``transformers``: writing and reading the folder needs only safetensors and json, so
``stamen generate`` works without it.

The tokenizer is bytes: token ids are UTF-8 byte values (``config.json`` says so under
``stamen.tokenizer``). A user module that is not stamen's GPT is written under its own
parameter names with ``config.json`` naming its factory; only GPT folders load into
``transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stamen.core.errors import UserError
from stamen.core.model import GPT, GPTConfig, ModelSpec, load_weights

CONFIG, WEIGHTS = "config.json", "model.safetensors"
# stamen's Linear layers whose GPT-2 counterparts are Conv1D (weight stored as [in, out]).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_supported(cfg: GPTConfig) -> str | None:
    """None if GPT-2 can hold this config exactly, else why not."""
    if cfg.head_dim * cfg.n_head != cfg.n_embd:
        return f"head_dim {cfg.head_dim} x n_head {cfg.n_head} != n_embd {cfg.n_embd}"
    if not cfg.bias:
        return "GPT-2 layers always have biases"
    return None


def to_gpt2(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """stamen GPT weights (``weights(model)`` names) → GPT2LMHeadModel's state dict."""
    out = {}
    for name, t in state.items():
        if name.startswith("blocks."):
            _, idx, rest = name.split(".", 2)
            key = f"transformer.h.{idx}.{rest}"
            t = t.t() if rest in _CONV1D else t
        elif name == "lm_head.weight":
            key = name
        else:
            key = f"transformer.{name}"
        out[key] = t.detach().to("cpu", torch.float32).contiguous()
    if cfg.tie_weights:
        out.pop("lm_head.weight", None)
    return out


def from_gpt2(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``to_gpt2``: GPT2LMHeadModel names → stamen's (tied head omitted)."""
    out = {}
    for key, t in state.items():
        if key.startswith("transformer.h."):
            idx, rest = key.removeprefix("transformer.h.").split(".", 1)
            if rest in ("attn.bias", "attn.masked_bias"):
                continue  # older GPT-2 files keep the causal mask as a buffer
            out[f"blocks.{idx}.{rest}"] = t.t().contiguous() if rest in _CONV1D else t
        elif key.startswith("transformer."):
            out[key.removeprefix("transformer.")] = t
        elif key == "lm_head.weight" and not cfg.tie_weights:
            out[key] = t
    return out


def gpt2_config(cfg: GPTConfig, model_name: str) -> dict:
    """GPT2Config's fields for ``cfg``, plus what stamen needs to read the folder back."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.mlp_hidden,
        "activation_function": "gelu_new",  # GPT-2's name for GELU with the tanh approximation
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": 10, "eos_token_id": 10,  # a newline byte: text has no special tokens
        "torch_dtype": "float32",
        "stamen": {"model": model_name, "tokenizer": "bytes"},
    }


def save_model(spec: ModelSpec, state: dict[str, torch.Tensor], out: str | Path, extra: dict | None = None) -> Path:
    """Write ``state`` (``weights(model)`` names) as a model folder; GPT-2 layout for stamen's
    GPT. ``extra`` goes into ``config.json``'s ``stamen`` entry (e.g. the version)."""
    folder = Path(out)
    cfg = spec.gpt_config()
    if cfg is not None and gpt2_supported(cfg) is None:
        config, tensors = gpt2_config(cfg, spec.name), to_gpt2(state, cfg)
    else:
        config = {"stamen": {"model": spec.name, "tokenizer": "bytes"}}
        tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in state.items()}
    config["stamen"] |= extra or {}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_model(folder: str | Path) -> tuple[torch.nn.Module, dict]:
    """A model folder (``save_model``'s, or any GPT-2 folder with float weights) as a stamen
    module in eval mode, and its config."""
    root = Path(folder)
    if not (root / CONFIG).is_file() or not (root / WEIGHTS).is_file():
        raise UserError(f"not a model folder (no {CONFIG} and {WEIGHTS}): {root}")
    try:
        config = json.loads((root / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{root / CONFIG}: not JSON ({e})") from None
    state = load_file(root / WEIGHTS)
    if config.get("model_type") == "gpt2":
        cfg = GPTConfig(vocab_size=config["vocab_size"], block_size=config["n_positions"],
                        n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                        mlp_hidden=config.get("n_inner") or 0,
                        tie_weights=config.get("tie_word_embeddings", True))
        model = GPT(cfg)
        values = from_gpt2(state, cfg)
    else:
        name = config.get("stamen", {}).get("model")
        if not name:
            raise UserError(f"{root / CONFIG}: neither a GPT-2 config nor a stamen model folder")
        model, values = ModelSpec(name).build(), state
    try:
        load_weights(model, {n: t.to(torch.float32) for n, t in values.items()})
    except KeyError as e:
        raise UserError(f"{root / WEIGHTS}: {e.args[0]}") from None
    return model.eval(), config
