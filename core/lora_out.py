"""Results a user takes away from a LoRA federation on a Hugging Face base: the adapter in PEFT's
own format (``peft.PeftModel.from_pretrained`` loads it) and the merged model as a standard
folder (``AutoModelForCausalLM.from_pretrained`` loads it), plus greedy generation from either.

PEFT names a LoRA tensor ``base_model.model.<module>.lora_A.weight`` and scales it by
``lora_alpha / r``; the global adapter is saved at rank r_max with alpha = scale · r_max, so
PEFT's product is exactly stamen's."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from stamen.core.errors import UserError
from stamen.core.hf import build_hf, hf_folder, load_tokenizer, speaks_bytes
from stamen.core.instruct import base_encoding, encode_bytes
from stamen.core.lora import A, B, LoraPlan, LoraSpace, load_adapter, merge

HF = "hf."  # module names inside core.hf.CausalLM start with this; PEFT's do not


def _hf_name(module: str) -> str:
    if not module.startswith(HF):
        raise UserError("only an adapter over a Hugging Face base (hf:PATH) is saved in PEFT's format")
    return module[len(HF):]


def save_peft_adapter(space: LoraSpace, adapter: dict[str, torch.Tensor], folder: Path, base: str) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``."""
    from peft import LoraConfig

    transposed = {t for _, _, t in space.targets.values()}
    if len(transposed) != 1:
        raise UserError("PEFT needs one weight layout (fan_in_fan_out) for every adapted layer")
    folder.mkdir(parents=True, exist_ok=True)
    modules = [_hf_name(m) for m in space.targets]
    LoraConfig(r=space.r_max, lora_alpha=space.alpha, target_modules=modules, lora_dropout=0.0, bias="none",
               fan_in_fan_out=transposed.pop(), task_type="CAUSAL_LM", inference_mode=True,
               base_model_name_or_path=str(hf_folder(base).resolve())).save_pretrained(str(folder))
    tensors = {}
    for m in space.targets:
        for part in (A, B):
            tensors[f"base_model.model.{_hf_name(m)}{part}.weight"] = adapter[m + part].contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def save_merged(space: LoraSpace, adapter: dict[str, torch.Tensor], base: str, out: Path) -> Path:
    """Fold the adapter into an fp32 copy of the base and save it, with the base's tokenizer,
    as a Hugging Face folder. A byte-level base (a stamen model folder) has no tokenizer files:
    its config's ``stamen.tokenizer = "bytes"`` carries over, and nothing else is written
    (transformers would otherwise invent an empty GPT-2 tokenizer for it)."""
    folder = hf_folder(base)
    model = LoraPlan("merge", space.r_max).build(build_hf(folder), space)
    load_adapter(model, adapter)
    merged = merge(model)
    merged.hf.save_pretrained(out)
    if not speaks_bytes(folder):  # base_encoding would load the tokenizer a second time
        load_tokenizer(folder).save_pretrained(out)
    return out


@torch.no_grad()
def generate(base: str, prompt: str, max_new_tokens: int, adapter: str | None = None) -> str:
    """Greedy completion of ``prompt`` by the base, or by the base with a PEFT adapter folder."""
    from transformers import AutoModelForCausalLM

    folder = hf_folder(base)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter)
    encode, eos = base_encoding(base)  # a stamen model folder speaks bytes and has no tokenizer files
    ids = torch.tensor([encode(prompt)], dtype=torch.long)
    if ids.shape[1] == 0:
        raise UserError("the prompt is empty")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and ids.shape[1] + max_new_tokens > context:
        raise UserError(f"the prompt ({ids.shape[1]} tokens) and --max-new-tokens {max_new_tokens} exceed the "
                        f"model's context of {context} tokens")
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=eos, eos_token_id=eos)  # the end token fine-tuning taught
    new = [t for t in out[0, ids.shape[1]:].tolist() if t != eos]
    if encode is encode_bytes:
        return bytes(new).decode("utf-8", errors="replace")
    return load_tokenizer(folder).decode(new, skip_special_tokens=True)
