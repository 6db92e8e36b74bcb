"""What a new user hit (issue 15), one test each: CLI mistakes are one line on stderr and exit
2, a dead server is one line at once, settings are checked at start-up, clients and the server
say what they do."""

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from federation_procs import ENV, free_port, running_server, stamen, stdlib_folders
from stamen.server.auth import create_token


def one_line(r: subprocess.CompletedProcess, message: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("port", ["-1", "99999", "http"])
def test_server_port_out_of_range_is_a_usage_error(port, tmp_path):
    r = stamen("server", "--state", tmp_path / "s", "--port", port)
    one_line(r, "--port")
    assert not (tmp_path / "s").exists()


def test_server_port_in_use_is_one_line_and_never_says_serving(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = stamen("server", "--state", tmp_path / "s", "--port", port)
    one_line(r, f"cannot listen on 127.0.0.1:{port}: address already in use")
    assert "serving" not in r.stdout + r.stderr


def test_a_bad_codec_stops_the_server_at_start_up(tmp_path):
    (tmp_path / "fed.toml").write_text('[tiers.laptop]\ncodec = "int9+zstd(1)"\n')
    r = stamen("server", "--state", tmp_path / "s", "--config", tmp_path / "fed.toml", "--port", free_port())
    one_line(r, "[tiers.laptop]: codec: unknown codec stage 'int9'")


@pytest.mark.parametrize("budget", ["0", "-5", "soon"])
def test_budget_minutes_must_be_positive(budget, tmp_path):
    r = stamen("client", "--server", "http://127.0.0.1:1", "--token", "t", "--data", "stdlib",
               "--budget-minutes", budget)
    one_line(r, "--budget-minutes")


def test_token_create_needs_a_federation_or_init(tmp_path):
    r = stamen("token", "create", "--role", "device", "--state", tmp_path / "typo")
    one_line(r, "holds no federation")
    assert not (tmp_path / "typo").exists()  # nothing created behind the user's back
    made = stamen("token", "create", "--role", "device", "--state", tmp_path / "fed", "--init")
    assert made.returncode == 0 and made.stdout.startswith("stj_device_")
    again = stamen("token", "create", "--role", "gpu", "--state", tmp_path / "fed")
    assert again.returncode == 0 and again.stdout.startswith("stj_gpu_")


@pytest.mark.parametrize("command", ["client", "device-emulator"])
def test_one_memory_option_for_both_clients(command, tmp_path):
    extra = ["--runtime", "ort"] if command == "device-emulator" else []
    r = stamen(command, "--server", "http://127.0.0.1:1", "--token", "t", "--data", "stdlib", *extra,
               "--max-memory", "lots")
    one_line(r, "argument --max-memory: not a memory size: 'lots'")


@pytest.mark.parametrize("command", ["client", "device-emulator"])
def test_a_url_without_scheme_is_a_usage_error(command, tmp_path):
    extra = ["--runtime", "ort"] if command == "device-emulator" else []
    r = stamen(command, "--server", "127.0.0.1:8080", "--token", "t", "--data", "stdlib", *extra)
    one_line(r, "'127.0.0.1:8080' is not an http(s) URL: write e.g. http://127.0.0.1:8080")


@pytest.mark.parametrize("command", ["client", "device-emulator"])
def test_a_dead_server_is_one_line_not_a_retry_loop(command, tmp_path):
    """It used to print nothing and retry forever; the subprocess timeout is the failure mode."""
    (tmp_path / "t.txt").write_text("some text to train on\n" * 50)
    url = f"http://127.0.0.1:{free_port()}"
    extra = ["--runtime", "ort", "--cache", tmp_path / "c"] if command == "device-emulator" else ["--state", tmp_path / "c"]
    r = subprocess.run([sys.executable, "-m", "stamen", command, "--server", url, "--token", "t",
                        "--data", str(tmp_path / "t.txt"), *map(str, extra)],
                       capture_output=True, text=True, env=ENV, timeout=120)
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 2 and errors == [f"stamen: error: cannot reach {url}: connection refused"], r.stderr


def test_help_describes_every_flag_and_shows_defaults():
    from stamen.cli import build_parser

    parser = build_parser()
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    token = [a for a in commands["token"]._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    for name, sub in [*commands.items(), *(("token " + k, v) for k, v in token.items())]:
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"stamen {name} {action.option_strings[0]} has no description"
    text = stamen("server", "--help").stdout
    for flag, default in [("--host", "127.0.0.1"), ("--port", "8080"), ("--model", "gpt-tiny")]:
        assert flag in text and f"(default: {default})" in " ".join(text.split())
    client = " ".join(stamen("client", "--help").stdout.split())
    assert "--runtime" in client and "(default: auto)" in client and "(default: device)" in client


def test_library_chatter_is_hidden_and_ours_is_not():
    code = ("from stamen.cli import setup_logging; import logging, warnings; setup_logging(0); "
            "import torch; "  # imported after set-up, as the commands do: its import resets its loggers
            "logging.getLogger('torchao').warning('Failed to load a kernel'); "
            "logging.getLogger('torch.utils._pytree').warning('Enum subclass'); "
            "warnings.warn('to_edge is deprecated', FutureWarning); "
            "logging.getLogger('stamen.server.service').info('version 1: 3 updates')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and r.stderr.splitlines()[-1].endswith("INFO stamen.server.service: version 1: 3 updates")
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_plans_use_the_federations_shapes(tmp_path):
    from stamen.core.model import ModelSpec
    from stamen.core.plan import plans_table

    (tmp_path / "fed.toml").write_text("[training]\nseq_len = 32\n[tiers.laptop]\nbatch_size = 4\n")
    r = stamen("plans", "--config", tmp_path / "fed.toml")
    assert r.returncode == 0, r.stderr
    laptop = next(line for line in r.stdout.splitlines() if line.startswith("laptop "))
    want = next(row for row in plans_table(ModelSpec("gpt-tiny"), 4, 32) if row["tier"] == "laptop")
    assert laptop.split()[3] == "4" and f"{want['memory_mb']:,.1f}" in laptop.split()


FED = """
[aggregation]
buffer_k = 1
[training]
seq_len = 32
[tiers.gpu]
steps = {steps}
batch_size = 2
"""


def test_status_table_and_json(tmp_path):
    with running_server(tmp_path, FED.format(steps=2)) as (url, state):
        admin = create_token(state, "admin")
        table = stamen("status", url, "--token", admin)
        raw = stamen("status", url, "--json", "--token", admin)
    assert table.returncode == 0 and raw.returncode == 0, table.stderr
    assert json.loads(raw.stdout)["version"] == 0
    lines = table.stdout.splitlines()
    assert lines[0].startswith("model gpt-tiny  version 0  global step 0")
    assert "(no client has joined)" in lines and "uncovered" not in table.stdout
    v0 = json.loads(raw.stdout)["evaluations"][0]
    assert json.loads(raw.stdout)["loss_unit"] == "nats/byte"
    assert f"{'version':>8}{'val loss':>10}  (held-out text, nats/byte)" in lines
    assert f"{0:>8}{v0['val_loss']:>10.4f}" in lines  # the held-out score of the starting version
    assert any(line.startswith("tensors: 0/") and "never trained: wte.weight" in line for line in lines)


def test_client_logs_a_line_per_task_and_a_summary_and_no_bars_when_piped(tmp_path):
    with running_server(tmp_path, FED.format(steps=3)) as (url, state):
        [data] = stdlib_folders(tmp_path, [["json"]])
        r = stamen("client", "--server", url, "--token", create_token(state, "gpu"), "--data", data,
                   "--role", "gpu", "--state", tmp_path / "c", "--max-tasks", "2")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr + r.stdout  # no progress bar in a log file
    lines = r.stderr.splitlines()
    assert any(f"data {data}: " in line and "text files" in line for line in lines)
    tasks = [line for line in lines if " task " in line and "mean loss" in line]
    assert len(tasks) == 2 and all(": accepted" in line for line in tasks), r.stderr
    assert "→" not in r.stderr  # the mean, not first batch → last batch
    assert lines[-1].split(": ", 1)[1].startswith("done: 2 tasks (2 accepted), 384 tokens")  # 2 tasks x 3 steps x 2 x 32


def test_ctrl_c_stops_within_a_step_and_says_so(tmp_path):
    with running_server(tmp_path, FED.format(steps=100000)) as (url, state):
        [data] = stdlib_folders(tmp_path, [["json"]])
        proc = subprocess.Popen([sys.executable, "-m", "stamen", "client", "--server", url, "--token",
                                 create_token(state, "gpu"), "--data", str(data), "--role", "gpu",
                                 "--state", str(tmp_path / "c")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                # a suite started in the background (`cmd &`) hands its children SIGINT
                                # ignored; a user's terminal does not
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while time.time() < deadline:  # until the task has trained some steps
            st = json.loads(stamen("status", url, "--json", "--token", create_token(state, "admin")).stdout)
            if st["in_flight"]:
                break
            time.sleep(0.5)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # 100,000 steps would take hours
    assert proc.returncode == 130, err
    m = re.search(r"interrupted: task \S+ stopped after (\d+) of (\d+) steps; its update is not sent", err)
    assert m and 0 < int(m.group(1)) < int(m.group(2)), err


def test_a_later_outage_logs_each_retry_and_gives_up_at_the_limit(caplog):
    """After the first answer an outage is retried (a restart), each retry logged with its
    delay, and given up after ``max_outage_s`` without an answer."""
    import asyncio
    import logging

    from aiohttp import web

    from stamen.core.errors import UserError
    from stamen.edge_client.session import RetryPolicy, Session

    async def ping(_: web.Request) -> web.Response:
        return web.Response(text="pong")

    async def scenario():
        app = web.Application()
        app.add_routes([web.get("/ping", ping)])
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        session = Session(f"http://127.0.0.1:{port}", retry=RetryPolicy(base_s=0.05, cap_s=0.2, max_outage_s=1.0))
        try:
            assert (await session.request("GET", "/ping"))[1] == b"pong"
            await runner.cleanup()  # the server goes away
            with pytest.raises(UserError, match=r"unreachable for \d+ s \(\d+ attempts, last: connection refused\); giving up"):
                await session.request("GET", "/ping")
        finally:
            await session.close()

    with caplog.at_level(logging.WARNING, logger="stamen.edge_client.session"):
        asyncio.run(scenario())
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) >= 2 and all(re.fullmatch(r"GET /ping: connection refused; retry \d+ in \d+\.\d s "
                                                  r"\(gives up after 1 s without an answer\)", m) for m in retries)
