"""``stamen`` subcommands of a live federation: the server, its tokens and status, and the
clients that train for it (``client``, ``device-emulator``)."""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from stamen.cli_models import MODEL_HELP, positive_float, positive_int
from stamen.core.errors import UserError
from stamen.core.names import check_model_name
from stamen.core.wire import BUNDLE_RUNTIMES, RUNTIMES

def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0-65535, got {value}")
    return value


def server_url(text: str) -> str:
    """An http(s) URL with a host: a bare ``HOST:PORT`` is a usage mistake, not a retry loop."""
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL: write e.g. http://{text.split('://')[-1]}")
    try:
        parts.port
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return text.rstrip("/")


def memory_size(text: str) -> int:
    """``512M``, ``4G``, ``1.5GB`` or a plain byte count, in bytes (one spelling for ``client``
    and ``device-emulator``)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (use e.g. 512M or 4G)") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"memory size must be positive, got {text!r}")
    return int(value)


CA_HELP = "PEM certificate(s) to trust for an https server (e.g. its self-signed one)"
DATA_HELP = ("'stdlib', a text file, a folder of text files, or a .jsonl file (a LoRA federation: instructions, "
             "'stdlib' or a .jsonl of instruction/input/output)")


def cmd_server(args: argparse.Namespace) -> None:
    if bool(args.tls_cert) != bool(args.tls_key):  # mistakes are answered before torch loads
        raise UserError("--tls-cert and --tls-key go together")
    check_model_name(args.model)
    from stamen.core.model import ModelSpec
    from stamen.server.app import run_server

    ModelSpec(args.model)
    run_server(args.model, args.state, args.config, args.host, args.port, args.tls_cert, args.tls_key, args.eval_data)


def cmd_token(args: argparse.Namespace) -> None:
    from stamen.server.auth import create_token

    print(create_token(args.state, args.role, args.init, args.uses, args.expires))


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def cmd_token_list(args: argparse.Namespace) -> None:
    from stamen.server.auth import list_tokens

    print(f"{'id':<14}{'role':<8}{'created (UTC)':<18}{'uses':>6}{'limit':>7}  {'expires (UTC)':<18}"
          f"{'revoked (UTC)':<18}{'clients':>8}")
    for t in list_tokens(args.state):
        limit = "-" if t.max_uses is None else str(t.max_uses)
        print(f"{t.id:<14}{t.role:<8}{_when(t.created):<18}{t.uses:>6}{limit:>7}  {_when(t.expires):<18}"
              f"{_when(t.revoked):<18}{t.clients:>8}")


def cmd_token_revoke(args: argparse.Namespace) -> None:
    from stamen.server.auth import revoke_token

    token, clients = revoke_token(args.state, args.id)
    print(f"revoked join token {token.id} ({token.role}) and {len(clients)} client(s) that joined with it")


def duration(text: str) -> float:
    """'90s', '30m', '12h', '7d' (or plain seconds) → seconds, for argparse."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 12h or 7d") from None
    if not 0 < value < 1e10:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive duration")
    return value


def cmd_status(args: argparse.Namespace) -> None:
    status = fetch_status(args.url, args.token, args.ca_file)
    print(json.dumps(status, indent=2) if args.json else status_table(status, time.time()))


def fetch_status(url: str, token: str | None = None, ca_file: str | None = None) -> dict:
    """``stamen status URL --token ADMIN``: the server's /v1/status as a dict (the public
    aggregate without a token, where the server allows it); ``ca_file`` is trusted for https.
    A plain HTTP read, here rather than beside the server, so that it does not import the
    server (torch, aiohttp): ~3 CPU-s a call, which a script polling the status paid each time."""
    target = url.rstrip("/") + "/v1/status"
    if ca_file is not None and not Path(ca_file).is_file():
        raise UserError(f"CA file not found: {ca_file}")
    request = urllib.request.Request(target, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read())["error"]
        except (ValueError, KeyError, TypeError):
            reason = e.reason
        raise UserError(f"cannot read {target}: {e.code} {reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"cannot read {target}: {e}") from None


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def status_table(st: dict, now: float) -> str:
    """``/v1/status`` as a person reads it: the model's state, then per-tier and per-client
    tables, the validation history, and which tensors no update has trained yet."""
    tasks = ", ".join(f"{k} {v:,}" for k, v in sorted(st["tasks"].items())) or "none yet"
    lines = [f"model {st['model']}  version {st['version']}  global step {st['global_step']:,}  "
             f"buffered {st['buffered']}  in flight {st['in_flight']}",
             f"tasks: {tasks}", ""]
    lines.append(f"{'tier':<12}{'updates':>9}{'tokens':>14}")
    for tier, t in st["tiers"].items():
        lines.append(f"{tier:<12}{t['updates']:>9,}{t['tokens']:>14,}")
    if not st["tiers"]:
        lines.append("(no update yet)")
    lines += ["", f"{'client':<16}{'role':<8}{'tier':<12}{'updates':>9}{'tokens':>14}  last seen"]
    for c in st["clients"]:
        lines.append(f"{c['client_id']:<16}{c['role']:<8}{c['tier']:<12}{c['updates']:>9,}{c['tokens']:>14,}  "
                     f"{_ago(c['last_seen'], now)}")
    if not st["clients"]:
        lines.append("(no client has joined)")
    evals = st.get("evaluations") or []
    if evals:
        lines += ["", f"{'version':>8}{'val loss':>10}  (held-out text, {st.get('loss_unit', 'nats/byte')})"]
        lines += [f"{e['version']:>8}{e['val_loss']:>10.4f}" for e in evals[-10:]]
    t = st["tensors"]
    lines.append("")
    if t["covered"] == t["total"]:
        lines.append(f"tensors: all {t['total']} trained by some update")
    else:
        names = t["uncovered"]
        shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
        lines.append(f"tensors: {t['covered']}/{t['total']} trained by some update; never trained: {shown}")
    return "\n".join(lines)


def cmd_client(args: argparse.Namespace) -> None:
    from stamen.edge_client.client import run_client

    run_client(args.server, args.token, args.data, args.runtime, args.role, args.max_memory,
               args.budget_minutes, args.state, args.max_tasks, args.ca_file, progress=sys.stderr.isatty())


def cmd_device_emulator(args: argparse.Namespace) -> None:
    from stamen.mobile_bridge.device import run_device

    run_device(args.server, args.token, args.runtime, args.data, args.cache, args.max_tasks, args.max_memory)


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
    s.add_argument("--port", type=port_number, default=8080, help="TCP port to listen on (0: any free port)")
    s.add_argument("--tls-cert", help="PEM certificate (serve HTTPS)")
    s.add_argument("--tls-key", help="PEM private key")
    s.add_argument("--eval-data", default="stdlib",
                   help="held-out text the server scores versions on ([evaluation] every N): 'stdlib' (its "
                        "validation split), a text file, a folder, or a .jsonl file")
    s.set_defaults(func=cmd_server)

    s = sub.add_parser("token", help="issue join tokens", formatter_class=formatter)
    tsub = s.add_subparsers(dest="action", required=True, parser_class=type(s))
    t = tsub.add_parser("create", help="create a join token for a role", formatter_class=formatter)
    t.add_argument("--role", required=True, choices=["device", "gpu", "admin"],
                   help="device: trains submodels; gpu: trains the full model; admin: reads full weights")
    t.add_argument("--state", required=True, help="the server's state folder")
    t.add_argument("--init", action="store_true", help="start a new federation in --state (else it must hold one)")
    t.add_argument("--uses", type=positive_int, help="joins the token allows (default: unlimited)")
    t.add_argument("--expires", type=duration, help="lifetime, e.g. 12h or 7d (default: never expires)")
    t.set_defaults(func=cmd_token)
    t = tsub.add_parser("list", help="join tokens with their uses, limits, expiry and clients", formatter_class=formatter)
    t.add_argument("--state", required=True, help="the server's state folder")
    t.set_defaults(func=cmd_token_list)
    t = tsub.add_parser("revoke", help="revoke a join token and every client that joined with it",
                        formatter_class=formatter)
    t.add_argument("id", help="the token's id as `stamen token list` shows it (6+ characters)")
    t.add_argument("--state", required=True, help="the server's state folder")
    t.set_defaults(func=cmd_token_revoke)

    s = sub.add_parser("status", help="a running server's status: tables, or JSON with --json", formatter_class=formatter)
    s.add_argument("url", type=server_url, help="the server's URL, e.g. http://127.0.0.1:8080")
    s.add_argument("--json", action="store_true", help="the raw /v1/status JSON instead of tables")
    s.add_argument("--token", help="an admin token (without one: the public aggregate, if the server allows it)")
    s.add_argument("--ca-file", help=CA_HELP)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("client", help="train for a federation on this machine's data", formatter_class=formatter)
    s.add_argument("--server", required=True, type=server_url, help="server URL, e.g. http://HOST:8080")
    s.add_argument("--token", required=True, help="join token from the operator")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--runtime", default="auto", choices=["auto", *RUNTIMES],
                   help="training runtime (auto: the fastest this machine has)")
    s.add_argument("--role", default="device", choices=["device", "gpu"],
                   help="device: a submodel sized to this machine; gpu: the full model (needs a gpu token)")
    s.add_argument("--max-memory", type=memory_size, help="memory training may use, e.g. 2G (default: half of what is free)")
    s.add_argument("--budget-minutes", type=positive_float, help="stop after this long (default: run until stopped)")
    s.add_argument("--state", default=str(Path.home() / ".stamen" / "client"),
                   help="keeps the client's token and error-feedback residuals across restarts")
    s.add_argument("--max-tasks", type=positive_int, help="stop after this many tasks")
    s.add_argument("--ca-file", help=CA_HELP)
    s.set_defaults(func=cmd_client)

    s = sub.add_parser("device-emulator", help="a runtime-only reference device, as a phone app would be",
                       formatter_class=formatter)
    s.add_argument("--server", required=True, type=server_url, help="server URL, e.g. http://HOST:8080")
    s.add_argument("--token", required=True, help="device join token")
    s.add_argument("--runtime", required=True, choices=BUNDLE_RUNTIMES, help="on-device training runtime")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--cache", default=str(Path.home() / ".stamen" / "device"), help="bundle cache folder")
    s.add_argument("--max-tasks", type=positive_int, help="stop after this many tasks")
    s.add_argument("--max-memory", type=memory_size, default="8M",
                   help="memory the device declares, e.g. 8M (the server sizes its submodel to it)")
    s.set_defaults(func=cmd_device_emulator)

    s = sub.add_parser("flower-config", help="add or update a SuperLink connection for `flwr run` (safe to repeat)",
                       formatter_class=formatter)
    s.add_argument("--name", default="stamen", help="the connection's name, as `flwr run APP NAME` uses it")
    s.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's HOST:PORT")
    tls = s.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperLink (it runs with --insecure)")
    tls.add_argument("--root-certificates", help="PEM CA certificate(s) to verify the SuperLink's TLS certificate")
    s.set_defaults(func=cmd_flower_config)
