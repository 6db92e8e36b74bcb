"""Tiny random Hugging Face causal LMs of two families, saved as a user's folder would be
(config + safetensors + tokenizer files), for the tests that load them through ``hf:PATH``."""

from pathlib import Path

import torch


def save_tiny(kind: str, folder: Path, seed: int = 0, positions: int = 128) -> Path:
    """A tiny Llama or GPT-2 with stamen's byte tokenizer, saved to ``folder``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from stamen.core.hf import byte_tokenizer

    if kind == "llama":
        cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=257, n_embd=32, n_layer=2, n_head=4, n_positions=positions)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
