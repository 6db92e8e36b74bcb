"""The ``stamen`` command: one entry point, a subcommand per job.

Every user mistake (an unknown preset, a bad path, a bad number) is one line on stderr and exit
code 2; the heavy imports happen inside each subcommand so ``stamen --help`` is instant."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from stamen.cli_models import positive_int
from stamen.core.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line rather than usage text plus a line."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def _hours(h: float | None) -> str:
    return "never" if h is None else f"{h:.3g} h"


def cmd_simulate(args: argparse.Namespace) -> None:
    if args.seeds is not None and args.compare is None and not args.sync_vs_async:
        raise UserError("--seeds applies to --compare and --sync-vs-async")
    seeds = 3 if args.seeds is None else args.seeds
    import json
    from dataclasses import replace

    from stamen.simulator.config import load_simulation
    from stamen.simulator.ray_backend import check_backend

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
    # Only now the modules that run and report (matplotlib among them): a mistake in the config
    # is answered before they load (3.4-3.7 s to the error line instead of 4.1-4.5; the rest is
    # torch and Ray, which the config's own modules import).
    from stamen.simulator.compare import VARIANTS, compare, sync_vs_async
    from stamen.simulator.report import domains
    from stamen.simulator.run import simulate

    setup = replace(setup, sim=sim)
    out = Path(args.out)
    if args.compare is not None:
        names = tuple(n.strip() for n in args.compare.split(",") if n.strip())
        unknown = [n for n in names if n not in VARIANTS]
        if not names or unknown or len(set(names)) != len(names):
            raise UserError(f"--compare takes distinct names among {', '.join(VARIANTS)}, got {args.compare!r}")
        result = compare(setup, names, out, seeds)
        for d in result["domains"]:
            row = ", ".join(f"{name} {m[d]:.3f}" for name, m in result["median"].items())
            print(f"{d} text, final validation loss (median of {len(result['seeds'])} seeds): {row}")
        print(f"report in {out}/compare.json and compare_*.png")
        return
    if args.sync_vs_async:
        result = sync_vs_async(setup, out, seeds)
        for r in result["seeds"]:
            hours = r["hours_to_target"]
            print(f"seed {r['seed']}: to validation loss {r['target_val_loss']:.3f}, async {_hours(hours['async'])}, "
                  f"sync {_hours(hours['sync'])}")
        median = result["median_async_speedup"]
        print(f"async is {median:.1f}x sooner (median)" if median is not None else "no seed reached the target both ways",
              f"; report in {out}/sync_vs_async.json and .png", sep="")
        return
    summary = simulate(setup, out, progress=not args.quiet and sys.stderr.isatty())
    timing = json.loads((out / "timing.json").read_text())
    line = (f"{summary['versions']} versions in {summary['end_time_h']:.2f} virtual hours, final validation loss "
            f"{summary['final_val_loss']:.3f}")
    against = []
    if "gpu_only" in summary:
        against.append(f"GPU nodes alone {summary['gpu_only']['final_val_loss']:.3f}")
    if "baseline" in summary:
        against.append(f"centralized on the same tokens {summary['baseline']['final_val_loss']:.3f}")
    if against:
        line += f" ({'; '.join(against)})"
    print(f"{line}; {timing['wall_s']:.0f} s wall, peak {timing['peak_rss_mib']:.0f} MiB; report in {out}/")
    last = summary["evals"][-1]
    for d in domains(last):
        row = f"{d} text: {last[f'val_{d}']:.3f}"
        if "gpu_only" in summary:
            row += f" (GPU nodes alone {summary['gpu_only']['evals'][-1][f'val_{d}']:.3f})"
        print(row)


class _Help(argparse.HelpFormatter):
    """Help that shows every option's default (unless it has none, or its help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from stamen import cli_federation, cli_models

    p = _Parser(prog="stamen", description="Federated training across very unequal hardware.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    cli_models.register(sub, _Help)
    cli_federation.register(sub, _Help)

    s = sub.add_parser("simulate", help="simulate a federation of thousands of heterogeneous devices", formatter_class=_Help)
    s.add_argument("--config", help="simulation TOML; keys you leave out keep the packaged defaults")
    s.add_argument("--out", required=True, help="report folder (summary.json, plots, model/)")
    s.add_argument("--devices", type=positive_int, help="override the population's device count")
    s.add_argument("--seed", type=int, help="override the seed (devices, data, weights, events)")
    s.add_argument("--backend", choices=["local", "ray"], help="where devices train (default: the config's)")
    s.add_argument("--address", help="a Ray cluster's HOST:PORT (with --backend ray; default: a local Ray)")
    runs = s.add_mutually_exclusive_group()
    runs.add_argument("--sync-vs-async", action="store_true",
                      help="run the population both as synchronous rounds and asynchronously, and compare (--seeds seeds from --seed)")
    runs.add_argument("--compare", metavar="VARIANTS",
                      help="run variants of the population side by side, e.g. mixed,gpu-only,devices-only, with "
                           "centralized training at equal tokens (--seeds seeds from --seed)")
    s.add_argument("--seeds", type=positive_int,
                   help="how many seeds --compare and --sync-vs-async repeat over, with the median (default 3; "
                        "1 takes a third of the time)")
    s.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    s.set_defaults(func=cmd_simulate)
    return p


def setup_logging(verbose: int) -> None:
    """One handler on stderr for every ``stamen.*`` logger: INFO by default (a line per task,
    per version), DEBUG with -vv. Libraries (torch, torchao, ExecuTorch, ONNX) say only errors,
    and their deprecation warnings are hidden, unless -v: their chatter buried our results."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if verbose else logging.ERROR)
    library = logging.WARNING if verbose else logging.ERROR
    logging.getLogger("torch").setLevel(library)  # torch has its own handler...
    logging.getLogger("torch.utils._pytree").setLevel(library)  # ...and resets "torch" to WARNING when imported
    logging.getLogger("stamen").setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    if not verbose:
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        setup_logging(args.verbose)
        args.func(args)
    except UserError as e:
        print(f"stamen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stamen: interrupted", file=sys.stderr)
        return 130
    return 0
