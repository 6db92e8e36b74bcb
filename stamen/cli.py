"""The ``stamen`` command: one entry point, a subcommand per job.

Every user mistake (an unknown preset, a bad path, a bad number) is one line on stderr and exit
code 2; the heavy imports happen inside each subcommand so ``stamen --help`` is instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stamen.core.errors import UserError
from stamen.core.wire import BUNDLE_RUNTIMES, RUNTIMES


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line rather than usage text plus a line."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def cmd_models(args: argparse.Namespace) -> None:
    from stamen.core.model import PRESETS, ModelSpec, gpt_param_count

    print(f"{'preset':<12}{'params':>15}  {'layers':>6} {'heads':>5} {'d_model':>7} {'context':>7} {'vocab':>6}")
    for name, cfg in PRESETS.items():
        print(f"{name:<12}{gpt_param_count(cfg):>15,}  {cfg.n_layer:>6} {cfg.n_head:>5} {cfg.n_embd:>7}"
              f" {cfg.block_size:>7} {cfg.vocab_size:>6}   {ModelSpec(name).hash}")


def cmd_baseline(args: argparse.Namespace) -> None:
    from stamen.core.baseline import BaselineConfig, run_baseline
    from stamen.core.model import ModelSpec

    ModelSpec(args.model)  # fail on a bad name before loading any data
    cfg = BaselineConfig(model=args.model, data=args.data, tokens=args.tokens, batch_size=args.batch_size,
                         seq_len=args.seq_len, lr=args.lr, seed=args.seed)
    summary = run_baseline(cfg, Path(args.out), progress=not args.quiet)
    print(f"final validation loss {summary['final_val_loss']:.4f} nats/byte "
          f"(byte-unigram entropy {summary['unigram_entropy']:.4f}) after {summary['tokens']:,} tokens "
          f"in {summary['wall_s']:.0f} s; report in {args.out}/")


def cmd_plans(args: argparse.Namespace) -> None:
    from stamen.core.model import ModelSpec
    from stamen.core.plan import plans_table

    if args.lora:
        return _lora_plans(args)
    if args.model.startswith("hf:"):
        raise UserError("a Hugging Face base is fine-tuned with LoRA plans: add --lora")
    rows = plans_table(ModelSpec(args.model), args.batch_size, args.seq_len)
    print(f"plans of {args.model} at batch {args.batch_size} x seq {args.seq_len} (memory: fp32 weights, "
          "grads, AdamW state, activations)")
    print(f"{'tier':<11}{'blocks':<16}{'width':>6}{'params':>14}{'trainable':>14}{'memory MiB':>12}{'MFLOP/token':>13}  plan")
    for r in rows:
        blocks = ",".join(map(str, r["blocks"])) if len(r["blocks"]) <= 4 else f"{r['blocks'][0]}-{r['blocks'][-1]}"
        print(f"{r['tier']:<11}{blocks:<16}{r['width']:>6.2f}{r['params']:>14,}{r['trainable']:>14,}"
              f"{r['memory_mb']:>12,.1f}{r['flops_per_token'] / 1e6:>13,.2f}  {r['plan']}")


def _lora_plans(args: argparse.Namespace) -> None:
    from stamen.core.lora import lora_plans_table, lora_space
    from stamen.core.model import ModelSpec

    base = ModelSpec(args.model).build(weights=False)  # shapes only: no weight file is read
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


def cmd_generate(args: argparse.Namespace) -> None:
    from stamen.core.hf import is_hf
    from stamen.core.lora_out import generate

    if not is_hf(args.model):
        raise UserError("generate reads a Hugging Face folder: --model hf:PATH")
    print(generate(args.model, args.prompt, args.max_new_tokens, args.adapter))


def cmd_server(args: argparse.Namespace) -> None:
    from stamen.core.model import ModelSpec
    from stamen.server.app import run_server

    ModelSpec(args.model)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    scheme = "https" if args.tls_cert else "http"
    print(f"stamen server: {args.model} on {scheme}://{args.host}:{args.port}, state in {args.state}/ "
          "(Ctrl-C checkpoints and stops)", file=sys.stderr)
    run_server(args.model, args.state, args.config, args.host, args.port, args.tls_cert, args.tls_key)


def cmd_token(args: argparse.Namespace) -> None:
    from stamen.server.auth import create_token

    print(create_token(args.state, args.role))


def cmd_status(args: argparse.Namespace) -> None:
    import json

    from stamen.server.app import fetch_status

    print(json.dumps(fetch_status(args.url, args.ca_file), indent=2))


def cmd_client(args: argparse.Namespace) -> None:
    from stamen.edge_client.client import run_client
    from stamen.edge_client.probe import parse_size

    max_memory = parse_size(args.max_memory) if args.max_memory else None
    run_client(args.server, args.token, args.data, args.runtime, args.role, max_memory,
               args.budget_minutes, args.state, args.max_tasks, args.ca_file)


def resolve_plan(spec, text: str):
    """A tier name from the model's tier table, or a plan JSON file (``Plan.to_json``)."""
    from stamen.core.plan import Plan, tier_plans

    cfg = spec.gpt_config()
    tiers = tier_plans(cfg) if cfg is not None else {}
    if text in tiers:
        return tiers[text]
    path = Path(text)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"plan file not found: {path}")
        return Plan.from_json(path.read_text())
    raise UserError(f"unknown plan {text!r}: use a tier ({', '.join(tiers)}) or a plan .json file")


def cmd_export(args: argparse.Namespace) -> None:
    from stamen.core.model import ModelSpec
    from stamen.mobile_bridge.bundle import export_bundle

    spec = ModelSpec(args.model)
    if spec.gpt_config() is None:
        raise UserError(f"model {args.model!r} is not a stamen GPT: only GPT plans can be exported")
    plan = resolve_plan(spec, args.plan)
    out = export_bundle(spec, plan, args.runtime, args.out, args.batch_size, args.seq_len,
                        xnnpack=not args.no_xnnpack)
    print(f"{args.runtime} bundle of {args.model} plan {plan.name} ({plan.hash}) in {out}/")


def cmd_device_emulator(args: argparse.Namespace) -> None:
    from stamen.mobile_bridge.device import run_device

    run_device(args.server, args.token, args.runtime, args.data, args.cache, args.max_tasks, args.memory_mb << 20)


def _hours(h: float | None) -> str:
    return "never" if h is None else f"{h:.3g} h"


def cmd_flower_config(args: argparse.Namespace) -> None:
    """Add or update one SuperLink connection in Flower's config file (``$FLWR_HOME/config.toml``,
    default ``~/.flwr``) with Flower's own reader and writer: running it again rewrites the same
    entry, where appending text to the file would break it."""
    import click
    from flwr.cli.flower_config import write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection
    from flwr.supercore.utils import get_flwr_home

    if args.root_certificates is not None:
        args.root_certificates = str(Path(args.root_certificates).resolve())
        if not Path(args.root_certificates).is_file():
            raise UserError(f"root certificates file not found: {args.root_certificates}")
    try:
        write_superlink_connection(SuperLinkConnection(args.name, args.superlink, args.root_certificates,
                                                       True if args.insecure else None))
    except (ValueError, click.ClickException) as e:
        raise UserError(e.message if isinstance(e, click.ClickException) else str(e)) from None
    print(f"SuperLink connection '{args.name}': {args.superlink}{' (insecure)' if args.insecure else ''} "
          f"in {get_flwr_home() / 'config.toml'}")


def cmd_simulate(args: argparse.Namespace) -> None:
    import json
    from dataclasses import replace

    from stamen.simulator.compare import VARIANTS, compare, sync_vs_async
    from stamen.simulator.config import load_simulation
    from stamen.simulator.ray_backend import check_backend
    from stamen.simulator.run import simulate

    setup = load_simulation(args.config)
    sim = setup.sim
    if args.devices is not None:
        sim = replace(sim, population=replace(sim.population, devices=args.devices))
    if args.seed is not None:
        sim = replace(sim, seed=args.seed, population=replace(sim.population, seed=args.seed))
    if args.backend is not None:
        sim = replace(sim, backend=args.backend)
    if args.address is not None:
        sim = replace(sim, address=args.address)
    check_backend(sim.backend, sim.address)
    setup = replace(setup, sim=sim)
    out = Path(args.out)
    if args.compare is not None:
        names = tuple(n.strip() for n in args.compare.split(",") if n.strip())
        unknown = [n for n in names if n not in VARIANTS]
        if not names or unknown or len(set(names)) != len(names):
            raise UserError(f"--compare takes distinct names among {', '.join(VARIANTS)}, got {args.compare!r}")
        result = compare(setup, names, out)
        for d in result["domains"]:
            row = ", ".join(f"{name} {m[d]:.3f}" for name, m in result["median"].items())
            print(f"{d} text, final validation loss (median of {len(result['seeds'])} seeds): {row}")
        print(f"report in {out}/compare.json and compare_*.png")
        return
    if args.sync_vs_async:
        result = sync_vs_async(setup, out)
        for r in result["seeds"]:
            hours = r["hours_to_target"]
            print(f"seed {r['seed']}: to validation loss {r['target_val_loss']:.3f}, async {_hours(hours['async'])}, "
                  f"sync {_hours(hours['sync'])}")
        median = result["median_async_speedup"]
        print(f"async is {median:.1f}x sooner (median)" if median is not None else "no seed reached the target both ways",
              f"; report in {out}/sync_vs_async.json and .png", sep="")
        return
    summary = simulate(setup, out, progress=not args.quiet)
    timing = json.loads((out / "timing.json").read_text())
    line = (f"{summary['versions']} versions in {summary['end_time_h']:.2f} virtual hours, final validation loss "
            f"{summary['final_val_loss']:.3f}")
    if "baseline" in summary:
        line += f" (centralized on the same tokens: {summary['baseline']['final_val_loss']:.3f})"
    print(f"{line}; {timing['wall_s']:.0f} s wall, peak {timing['peak_rss_mib']:.0f} MiB; report in {out}/")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stamen", description="Federated training across very unequal hardware.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("models", help="list model presets with parameter counts")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("plans", help="the tier table of submodels for a model, with their cost")
    s.add_argument("--model", default="gpt-tiny", help="preset, 'pkg.module:function' or 'hf:PATH' (with --lora)")
    s.add_argument("--batch-size", type=positive_int, default=8)
    s.add_argument("--seq-len", type=positive_int, default=128)
    s.add_argument("--lora", action="store_true", help="LoRA plans over the frozen base (with --model hf:PATH too)")
    s.add_argument("--lora-rank", type=positive_int, default=16, help="the global adapter's rank (GPU nodes' rank)")
    s.add_argument("--lora-targets", help="comma-separated module names to adapt (default: PEFT's for the model type)")
    s.add_argument("--lora-rule", choices=["fedavg", "exact"], default="fedavg",
                   help="fedavg: A and B train (FlowerTune); exact: A frozen, B trains (FFA-LoRA)")
    s.add_argument("--base", choices=["fp32", "bf16", "int8", "nf4"], help="every tier's base precision (default: per tier)")
    s.set_defaults(func=cmd_plans)

    s = sub.add_parser("generate", help="complete a prompt with a pretrained model, with or without a LoRA adapter")
    s.add_argument("--model", required=True, help="hf:PATH (a base, or a merged fine-tuned folder)")
    s.add_argument("--adapter", help="a PEFT adapter folder to apply to the base")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=positive_int, default=64)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("simulate", help="simulate a federation of thousands of heterogeneous devices")
    s.add_argument("--config", help="simulation TOML; keys you leave out keep the packaged defaults")
    s.add_argument("--out", required=True, help="report folder (summary.json, plots)")
    s.add_argument("--devices", type=positive_int, help="override the population's device count")
    s.add_argument("--seed", type=int, help="override the seed (devices, data, weights, events)")
    s.add_argument("--backend", choices=["local", "ray"], help="where devices train (default: the config's)")
    s.add_argument("--address", help="a Ray cluster's HOST:PORT (with --backend ray; default: a local Ray)")
    runs = s.add_mutually_exclusive_group()
    runs.add_argument("--sync-vs-async", action="store_true",
                      help="run the population both as synchronous rounds and asynchronously, and compare (3 seeds from --seed)")
    runs.add_argument("--compare", metavar="VARIANTS",
                      help="run variants of the population side by side, e.g. mixed,gpu-only,devices-only, with "
                           "centralized training at equal tokens (3 seeds from --seed)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("server", help="run a federation server (aggregator, scheduler, HTTP API)")
    s.add_argument("--model", default="gpt-tiny", help="preset or 'pkg.module:function'")
    s.add_argument("--state", required=True, help="state folder (SQLite ledger, checkpoints); reuse it to resume")
    s.add_argument("--config", help="federation TOML; keys you leave out keep their documented defaults")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--tls-cert", help="PEM certificate (serve HTTPS)")
    s.add_argument("--tls-key", help="PEM private key")
    s.set_defaults(func=cmd_server)

    s = sub.add_parser("token", help="issue join tokens")
    tsub = s.add_subparsers(dest="action", required=True, parser_class=_Parser)
    t = tsub.add_parser("create", help="create a join token for a role")
    t.add_argument("--role", required=True, choices=["device", "gpu", "admin"])
    t.add_argument("--state", required=True, help="the server's state folder")
    t.set_defaults(func=cmd_token)

    s = sub.add_parser("status", help="a running server's status as JSON")
    s.add_argument("url", help="e.g. http://127.0.0.1:8080")
    s.add_argument("--ca-file", help="PEM certificate(s) to trust for an https server (e.g. its self-signed one)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("client", help="train for a federation on this machine's data")
    s.add_argument("--server", required=True, help="server URL")
    s.add_argument("--token", required=True, help="join token from the operator")
    s.add_argument("--data", required=True, help="'stdlib', a folder of text files, or a .jsonl file")
    s.add_argument("--runtime", default="auto", choices=["auto", *RUNTIMES])
    s.add_argument("--role", default="device", choices=["device", "gpu"])
    s.add_argument("--max-memory", help="memory training may use, e.g. 2G (default: what the probe finds)")
    s.add_argument("--budget-minutes", type=float, help="stop after this long (default: run until stopped)")
    s.add_argument("--state", default=str(Path.home() / ".stamen" / "client"),
                   help="keeps the client's token and error-feedback residuals across restarts")
    s.add_argument("--max-tasks", type=positive_int, help="stop after this many tasks")
    s.add_argument("--ca-file", help="PEM certificate(s) to trust for an https server (e.g. its self-signed one)")
    s.set_defaults(func=cmd_client)

    s = sub.add_parser("export", help="export a plan's training program as an on-device bundle")
    s.add_argument("--model", default="gpt-tiny", help="preset or 'pkg.module:function'")
    s.add_argument("--plan", required=True, help="a tier (phone-low, ..., gpu) or a plan .json file")
    s.add_argument("--runtime", required=True, choices=BUNDLE_RUNTIMES)
    s.add_argument("--out", required=True, help="bundle folder (manifest.json, program, weights)")
    s.add_argument("--batch-size", type=positive_int, default=8, help="ExecuTorch programs have a static batch")
    s.add_argument("--seq-len", type=positive_int, default=64)
    s.add_argument("--no-xnnpack", action="store_true", help="ExecuTorch portable kernels only (4-16x slower)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("device-emulator", help="a runtime-only reference device, as a phone app would be")
    s.add_argument("--server", required=True, help="server URL")
    s.add_argument("--token", required=True, help="device join token")
    s.add_argument("--runtime", required=True, choices=BUNDLE_RUNTIMES)
    s.add_argument("--data", required=True, help="'stdlib', a folder of text files, or a .jsonl file")
    s.add_argument("--cache", default=str(Path.home() / ".stamen" / "device"), help="bundle cache folder")
    s.add_argument("--max-tasks", type=positive_int, help="stop after this many tasks")
    s.add_argument("--memory-mb", type=positive_int, default=8, help="memory the device declares")
    s.set_defaults(func=cmd_device_emulator)

    s = sub.add_parser("flower-config", help="add or update a SuperLink connection for `flwr run` (safe to repeat)")
    s.add_argument("--name", default="stamen", help="the connection's name, as `flwr run APP NAME` uses it")
    s.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's HOST:PORT")
    tls = s.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperLink (it runs with --insecure)")
    tls.add_argument("--root-certificates", help="PEM CA certificate(s) to verify the SuperLink's TLS certificate")
    s.set_defaults(func=cmd_flower_config)

    s = sub.add_parser("baseline", help="centralized training: the reference for federated runs")
    s.add_argument("--model", default="gpt-tiny", help="preset or 'pkg.module:function'")
    s.add_argument("--data", default="stdlib", help="'stdlib', a folder of text files, or a .jsonl file")
    s.add_argument("--tokens", type=positive_int, default=2_000_000, help="token budget")
    s.add_argument("--batch-size", type=positive_int, default=32)
    s.add_argument("--seq-len", type=positive_int, default=128)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output folder (summary.json, loss.png)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_baseline)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        print(f"stamen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stamen: interrupted", file=sys.stderr)
        return 130
    return 0
