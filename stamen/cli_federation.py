"""``stamen`` subcommands of a live federation: the server, its tokens and status, and the
clients that train for it (``client``, ``device-emulator``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stamen.cli_models import MODEL_HELP, positive_int
from stamen.core.errors import UserError
from stamen.core.wire import BUNDLE_RUNTIMES, RUNTIMES

CA_HELP = "PEM certificate(s) to trust for an https server (e.g. its self-signed one)"
DATA_HELP = "'stdlib', a text file, a folder of text files, or a .jsonl file"


def cmd_server(args: argparse.Namespace) -> None:
    from stamen.core.model import ModelSpec
    from stamen.server.app import run_server

    ModelSpec(args.model)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
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


def cmd_device_emulator(args: argparse.Namespace) -> None:
    from stamen.mobile_bridge.device import run_device

    run_device(args.server, args.token, args.runtime, args.data, args.cache, args.max_tasks, args.memory_mb << 20)


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


def register(sub, formatter) -> None:
    s = sub.add_parser("server", help="run a federation server (aggregator, scheduler, HTTP API)", formatter_class=formatter)
    s.add_argument("--model", default="gpt-tiny", help=MODEL_HELP)
    s.add_argument("--state", required=True, help="state folder (SQLite ledger, checkpoints); reuse it to resume")
    s.add_argument("--config", help="federation TOML; keys you leave out keep their documented defaults")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8080, help="TCP port to listen on (0: any free port)")
    s.add_argument("--tls-cert", help="PEM certificate (serve HTTPS)")
    s.add_argument("--tls-key", help="PEM private key")
    s.set_defaults(func=cmd_server)

    s = sub.add_parser("token", help="issue join tokens", formatter_class=formatter)
    tsub = s.add_subparsers(dest="action", required=True, parser_class=type(s))
    t = tsub.add_parser("create", help="create a join token for a role", formatter_class=formatter)
    t.add_argument("--role", required=True, choices=["device", "gpu", "admin"],
                   help="device: trains submodels; gpu: trains the full model; admin: reads full weights")
    t.add_argument("--state", required=True, help="the server's state folder")
    t.set_defaults(func=cmd_token)

    s = sub.add_parser("status", help="a running server's status as JSON", formatter_class=formatter)
    s.add_argument("url", help="e.g. http://127.0.0.1:8080")
    s.add_argument("--ca-file", help=CA_HELP)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("client", help="train for a federation on this machine's data", formatter_class=formatter)
    s.add_argument("--server", required=True, help="server URL, e.g. http://HOST:8080")
    s.add_argument("--token", required=True, help="join token from the operator")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--runtime", default="auto", choices=["auto", *RUNTIMES],
                   help="training runtime (auto: the fastest this machine has)")
    s.add_argument("--role", default="device", choices=["device", "gpu"],
                   help="device: a submodel sized to this machine; gpu: the full model (needs a gpu token)")
    s.add_argument("--max-memory", help="memory training may use, e.g. 2G (default: half of what is free)")
    s.add_argument("--budget-minutes", type=float, help="stop after this long (default: run until stopped)")
    s.add_argument("--state", default=str(Path.home() / ".stamen" / "client"),
                   help="keeps the client's token and error-feedback residuals across restarts")
    s.add_argument("--max-tasks", type=positive_int, help="stop after this many tasks")
    s.add_argument("--ca-file", help=CA_HELP)
    s.set_defaults(func=cmd_client)

    s = sub.add_parser("device-emulator", help="a runtime-only reference device, as a phone app would be",
                       formatter_class=formatter)
    s.add_argument("--server", required=True, help="server URL, e.g. http://HOST:8080")
    s.add_argument("--token", required=True, help="device join token")
    s.add_argument("--runtime", required=True, choices=BUNDLE_RUNTIMES, help="on-device training runtime")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--cache", default=str(Path.home() / ".stamen" / "device"), help="bundle cache folder")
    s.add_argument("--max-tasks", type=positive_int, help="stop after this many tasks")
    s.add_argument("--memory-mb", type=positive_int, default=8, help="memory the device declares, in MiB")
    s.set_defaults(func=cmd_device_emulator)

    s = sub.add_parser("flower-config", help="add or update a SuperLink connection for `flwr run` (safe to repeat)",
                       formatter_class=formatter)
    s.add_argument("--name", default="stamen", help="the connection's name, as `flwr run APP NAME` uses it")
    s.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's HOST:PORT")
    tls = s.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperLink (it runs with --insecure)")
    tls.add_argument("--root-certificates", help="PEM CA certificate(s) to verify the SuperLink's TLS certificate")
    s.set_defaults(func=cmd_flower_config)
