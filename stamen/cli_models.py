"""``stamen`` subcommands about models: presets, plans, on-device bundles, centralized
baselines, and models out (``export-model``, ``generate``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stamen.core.errors import UserError
from stamen.core.names import check_model_name, check_source
from stamen.core.wire import BUNDLE_RUNTIMES


def positive_int(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


MODEL_HELP = "a preset (see 'stamen models') or 'pkg.module:function'"


def cmd_models(args: argparse.Namespace) -> None:
    from stamen.core.model import PRESETS, ModelSpec, gpt_param_count

    print(f"{'preset':<12}{'params':>15}  {'layers':>6} {'heads':>5} {'d_model':>7} {'context':>7} {'vocab':>6}  hash")
    for name, cfg in PRESETS.items():
        print(f"{name:<12}{gpt_param_count(cfg):>15,}  {cfg.n_layer:>6} {cfg.n_head:>5} {cfg.n_embd:>7}"
              f" {cfg.block_size:>7} {cfg.vocab_size:>6}  {ModelSpec(name).hash}")
    print("vocab 256: the tokenizer is bytes (UTF-8); hash names the model's checkpoints and plans")


def cmd_plans(args: argparse.Namespace) -> None:
    from stamen.core.model import ModelSpec
    from stamen.core.plan import plans_table

    if args.lora:
        return _lora_plans(args)
    if args.model.startswith("hf:"):
        raise UserError("a Hugging Face base is fine-tuned with LoRA plans: add --lora")
    from stamen.server.config import load_config

    spec = ModelSpec(args.model)
    fed = load_config(args.config)
    seq = args.seq_len or fed.training.seq_len
    batch = {t: args.batch_size or fed.tiers[t].batch_size for t in fed.tiers}
    rows = {r["tier"]: r for b in sorted(set(batch.values())) for r in plans_table(spec, b, seq)
            if batch.get(r["tier"]) == b}
    source = args.config or "the packaged federation defaults"
    print(f"plans of {args.model} at the shapes {source} trains them: seq {seq}, each tier's batch "
          "(memory: fp32 weights, grads, AdamW state, activations)")
    print(f"{'tier':<11}{'blocks':<16}{'width':>6}{'batch':>6}{'params':>14}{'trainable':>14}{'memory MiB':>12}"
          f"{'MFLOP/token':>13}  plan")
    for tier, r in rows.items():
        blocks = ",".join(map(str, r["blocks"])) if len(r["blocks"]) <= 4 else f"{r['blocks'][0]}-{r['blocks'][-1]}"
        print(f"{tier:<11}{blocks:<16}{r['width']:>6.2f}{batch[tier]:>6}{r['params']:>14,}{r['trainable']:>14,}"
              f"{r['memory_mb']:>12,.1f}{r['flops_per_token'] / 1e6:>13,.2f}  {r['plan']}")


def _lora_plans(args: argparse.Namespace) -> None:
    from stamen.core.lora import lora_plans_table, lora_space
    from stamen.core.model import ModelSpec

    base = ModelSpec(args.model).build(weights=False)  # shapes only: no weight file is read
    args.batch_size, args.seq_len = args.batch_size or 8, args.seq_len or 128  # one shape for every LoRA tier
    targets = tuple(t for t in args.lora_targets.split(",") if t) if args.lora_targets else None
    space = lora_space(base, args.lora_rank, targets=targets)
    b = space.base
    print(f"LoRA plans of {args.model} ({b.params / 1e9:.2f}B params, {b.n_layer} layers, d {b.d_model}) at batch "
          f"{args.batch_size} x seq {args.seq_len}, rule {args.lora_rule}, {len(space.targets)} adapted layers "
          f"(global rank {space.r_max})")
    print("memory: base at its precision, adapter + grads + AdamW state, activations (ckpt: recomputed per block)")
    print(f"{'tier':<11}{'rank':>5}{'base':>6}{'ckpt':>5}{'trainable':>14}{'memory MiB':>13}{'GFLOP/token':>13}  plan")
    for r in lora_plans_table(space, args.batch_size, args.seq_len, args.lora_rule, args.base):
        print(f"{r['tier']:<11}{r['rank']:>5}{r['base']:>6}{'yes' if r['checkpointing'] else 'no':>5}"
              f"{r['trainable']:>14,}{r['memory_mb']:>13,.1f}{r['flops_per_token'] / 1e9:>13,.3f}  {r['plan']}")


def cmd_baseline(args: argparse.Namespace) -> None:
    check_model_name(args.model)  # a mistake is answered before torch loads
    check_source(args.data)
    from stamen.core.baseline import BaselineConfig, run_baseline
    from stamen.core.model import ModelSpec

    ModelSpec(args.model)  # an hf: folder or a factory is checked before loading any data
    cfg = BaselineConfig(model=args.model, data=args.data, tokens=args.tokens, batch_size=args.batch_size,
                         seq_len=args.seq_len, lr=args.lr, seed=args.seed)
    summary = run_baseline(cfg, Path(args.out), progress=not args.quiet and sys.stderr.isatty())
    print(f"final validation loss {summary['final_val_loss']:.4f} nats/byte "
          f"(byte-unigram entropy {summary['unigram_entropy']:.4f}) after {summary['tokens']:,} tokens "
          f"in {summary['wall_s']:.0f} s; model in {args.out}/model/, report in {args.out}/")


def resolve_plan(spec, text: str):
    """A tier name from the model's tier table, or a plan JSON file (``Plan.to_json``)."""
    from stamen.core.plan import Plan, tier_plans

    cfg = spec.gpt_config()
    tiers = tier_plans(cfg) if cfg is not None else {}
    if text in tiers:
        return tiers[text]
    path = Path(text)
    if path.suffix == ".json":
        return Plan.from_json(path.read_text())
    raise UserError(f"unknown plan {text!r}: use a tier ({', '.join(tiers)}) or a plan .json file")


def cmd_export(args: argparse.Namespace) -> None:
    check_model_name(args.model)  # a mistake is answered before torch loads
    if args.plan.endswith(".json") and not Path(args.plan).is_file():
        raise UserError(f"plan file not found: {args.plan}")
    from stamen.core.model import ModelSpec
    from stamen.mobile_bridge.bundle import export_bundle

    spec = ModelSpec(args.model)
    if spec.gpt_config() is None:
        raise UserError(f"model {args.model!r} is not a stamen GPT: only GPT plans can be exported")
    plan = resolve_plan(spec, args.plan)
    out = export_bundle(spec, plan, args.runtime, args.out, args.batch_size, args.seq_len,
                        xnnpack=not args.no_xnnpack)
    print(f"{args.runtime} bundle of {args.model} plan {plan.name} ({plan.hash}) in {out}/")


def cmd_export_model(args: argparse.Namespace) -> None:
    from stamen.core.gpt2 import save_model
    from stamen.core.model import ModelSpec
    from stamen.server.store import published_weights, state_lora, state_model

    spec = ModelSpec(state_model(args.state))
    lora = state_lora(args.state)
    space = None
    if lora is not None:
        from stamen.core.lora import described_space

        space = described_space(spec.build(weights=False), lora)
    version, state = published_weights(args.state, space or spec.gpt_config(), args.version)
    if space is not None:
        _export_adapter(spec, space, version, state, Path(args.out))
        return
    out = save_model(spec, state, args.out, extra={"version": version})
    layout = "GPT-2 (transformers' AutoModelForCausalLM)" if spec.gpt_config() is not None else "stamen"
    print(f"{spec.name} version {version} in {out}/ ({layout} layout, bytes tokenizer)")


def _export_adapter(spec, space, version: int, adapter: dict, out: Path) -> None:
    """A LoRA federation's version: the adapter in PEFT's format and the merged model."""
    from stamen.core.lora_out import save_merged, save_peft_adapter

    save_peft_adapter(space, adapter, out / "adapter", spec.name)
    save_merged(space, adapter, spec.name, out / "merged")
    print(f"{spec.name} + LoRA adapter version {version}: {out / 'adapter'}/ (PEFT's format: "
          f"PeftModel.from_pretrained, or stamen generate --adapter) and {out / 'merged'}/ (the merged model)")


def cmd_generate(args: argparse.Namespace) -> None:
    """A stamen model folder (bytes tokenizer, sampled), or ``hf:PATH`` with its own tokenizer
    and an optional LoRA adapter (greedy)."""
    from stamen.core.hf import is_hf

    if is_hf(args.model):
        from stamen.core.lora_out import generate as hf_generate

        print(hf_generate(args.model, args.prompt, args.max_new_tokens, args.adapter))
        return
    if args.adapter:
        raise UserError("--adapter applies to a Hugging Face base: --model hf:PATH")
    from stamen.core.gpt2 import load_model
    from stamen.core.sample import generate

    model, config = load_model(args.model)
    print(generate(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                   config.get("n_positions")))


def register(sub, formatter) -> None:
    s = sub.add_parser("models", help="list model presets with parameter counts", formatter_class=formatter)
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("plans", help="the tier table of submodels for a model, with their cost", formatter_class=formatter)
    s.add_argument("--model", default="gpt-tiny", help="preset, 'pkg.module:function' or 'hf:PATH' (with --lora)")
    s.add_argument("--config", help="federation TOML whose tier batches and seq_len the costs use "
                                     "(default: the packaged defaults, as 'stamen server' trains)")
    s.add_argument("--batch-size", type=positive_int, help="one batch for every tier instead of the federation's")
    s.add_argument("--seq-len", type=positive_int, help="sequence length instead of the federation's")
    s.add_argument("--lora", action="store_true", help="LoRA plans over the frozen base (with --model hf:PATH too)")
    s.add_argument("--lora-rank", type=positive_int, default=16, help="the global adapter's rank (GPU nodes' rank)")
    s.add_argument("--lora-targets", help="comma-separated module names to adapt (default: PEFT's for the model type)")
    s.add_argument("--lora-rule", choices=["fedavg", "exact"], default="fedavg",
                   help="fedavg: A and B train (FlowerTune); exact: A frozen, B trains (FFA-LoRA)")
    s.add_argument("--base", choices=["fp32", "bf16", "int8", "nf4"], help="every tier's base precision (default: per tier)")
    s.set_defaults(func=cmd_plans)

    s = sub.add_parser("export", help="export a plan's training program as an on-device bundle", formatter_class=formatter)
    s.add_argument("--model", default="gpt-tiny", help=MODEL_HELP)
    s.add_argument("--plan", required=True, help="a tier (phone-low, ..., gpu) or a plan .json file")
    s.add_argument("--runtime", required=True, choices=BUNDLE_RUNTIMES, help="on-device training runtime")
    s.add_argument("--out", required=True, help="bundle folder (manifest.json, program, weights)")
    s.add_argument("--batch-size", type=positive_int, default=8, help="ExecuTorch programs have a static batch")
    s.add_argument("--seq-len", type=positive_int, default=64, help="sequence length of the training program")
    s.add_argument("--no-xnnpack", action="store_true", help="ExecuTorch portable kernels only (4-16x slower)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("export-model", formatter_class=formatter,
                       help="write a server's model as a standard folder (config.json + model.safetensors; "
                            "GPT-2 layout that transformers loads); a LoRA federation's as OUT/adapter (PEFT's "
                            "format) and OUT/merged")
    s.add_argument("--state", required=True, help="the server's state folder")
    s.add_argument("--version", type=int,
                   help="an older version the server still keeps (the last tau_max + 1; default: the newest "
                        "published, the newest checkpoint plus its journal, even while the server runs)")
    s.add_argument("--out", required=True, help="model folder to write")
    s.set_defaults(func=cmd_export_model)

    s = sub.add_parser("generate", formatter_class=formatter,
                       help="continue a prompt with a model folder (export-model, baseline or simulate's), or with "
                            "a pretrained hf:PATH with or without a LoRA adapter")
    s.add_argument("--model", required=True,
                   help="a model folder (config.json + model.safetensors), or hf:PATH (a base, or a merged fine-tuned folder)")
    s.add_argument("--adapter", help="a PEFT adapter folder to apply to an hf:PATH base")
    s.add_argument("--prompt", required=True, help="text to continue")
    s.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (bytes, for stamen models)")
    s.add_argument("--temperature", type=float, default=0.8,
                   help="0 picks the likeliest token every step (hf:PATH models are always greedy)")
    s.add_argument("--top-k", type=positive_int, default=40, help="sample among the k likeliest tokens")
    s.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("baseline", help="centralized training: the reference for federated runs", formatter_class=formatter)
    s.add_argument("--model", default="gpt-tiny", help=MODEL_HELP)
    s.add_argument("--data", default="stdlib", help="'stdlib', a text file, a folder of text files, or a .jsonl file")
    s.add_argument("--tokens", type=positive_int, default=2_000_000, help="token budget")
    s.add_argument("--batch-size", type=positive_int, default=32, help="sequences per step")
    s.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence")
    s.add_argument("--lr", type=positive_float, default=3e-3, help="peak AdamW learning rate (warm-up, cosine decay)")
    s.add_argument("--seed", type=int, default=0, help="weights and batch order")
    s.add_argument("--out", required=True, help="output folder (summary.json, loss.png, model/)")
    s.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    s.set_defaults(func=cmd_baseline)
