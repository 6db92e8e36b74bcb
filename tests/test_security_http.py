"""Issue 13's defects against a real server process: refused joins leave no record, a client
that no longer fits does not stop a restart, hostile numbers get a 4xx (not a 500), join tokens
have use limits, expiry, revocation and a join rate, and the status is the operator's."""

import math
import sqlite3
import time

import msgpack
import pytest

from federation_procs import running_server, stamen, start_server
from stamen.server.auth import create_token
from test_server_http import call

FED = "[server]\njoin_burst = 3\njoins_per_minute = 1.0\n[aggregation]\nbuffer_k = 1\n"
CAPS = {"role": "device", "memory_bytes": 1 << 30, "flops": 1e12, "runtimes": ["torch"]}


def join(url, token, **caps):
    return call(url + "/v1/join", "POST", msgpack.packb({"join_token": token, "capabilities": {**CAPS, **caps}}))


def clients_in(state):
    with sqlite3.connect(state / "auth.db") as db:
        return db.execute("SELECT COUNT(*) FROM clients").fetchone()[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("sec"), FED) as running:
        yield running


@pytest.mark.parametrize("caps, code, reason", [
    ({"runtimes": ["bogus"]}, 400, "no supported runtime"),
    ({"flops": math.inf}, 422, "flops must be"),
    ({"flops": 6e305}, 422, "flops must be"),
    ({"flops": True}, 422, "flops must be"),
    ({"accelerator": None}, 422, "accelerator must be a string"),
    ({"memory_bytes": 2.5}, 422, "memory_bytes must be"),
    ({"runtimes": "torch"}, 422, "runtimes must be"),
    ({"cores": -1}, 422, "cores must be"),
    ({"up_bytes_s": math.nan}, 422, "up_bytes_s must be"),
])
def test_refused_joins_get_a_reason_and_write_nothing(server, caps, code, reason):
    url, state = server
    before = clients_in(state)
    status, answer = join(url, create_token(state, "device"), **caps)
    assert (status, reason in answer) == (code, True), answer
    assert clients_in(state) == before


def test_huge_numbers_in_queries_are_400(server):
    url, state = server
    me = join(url, create_token(state, "device"))[1]["token"]
    for path in ("/v1/task?wait=" + "9" * 401, "/v1/task?wait=-1", "/v1/weights/" + "9" * 401 + "?plan=x"):
        status, answer = call(url + path, token=me)
        assert status == 400 and "not a non-negative integer" in answer, (path, answer)


def test_join_token_use_limit_expiry_and_rate(server):
    url, state = server
    two = create_token(state, "device", max_uses=2)
    assert [join(url, two)[0] for _ in range(3)] == [200, 200, 403]
    assert "used up" in join(url, two)[1]
    brief = create_token(state, "device", expires_in_s=0.5)
    time.sleep(0.6)
    assert join(url, brief) == (403, "this join token has expired")
    # Burst 3, then one a minute: a leaked token cannot mint Sybils faster than that.
    many = create_token(state, "device")
    codes = [join(url, many)[0] for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert "too many joins" in join(url, many)[1]
    assert join(url, create_token(state, "device"))[0] == 200  # the limit is per token


def test_revoke_ends_the_token_and_its_clients(server):
    url, state = server
    token = create_token(state, "device")
    a, b = (join(url, token)[1]["token"] for _ in range(2))
    assert call(url + "/v1/task?wait=0", token=a)[0] == 200
    listed = stamen("token", "list", "--state", state)
    assert listed.returncode == 0, listed.stderr
    row = [line for line in listed.stdout.splitlines() if line.split()[-1] == "2" and " 2 " in line][-1]
    revoked = stamen("token", "revoke", row.split()[0], "--state", state)
    assert revoked.returncode == 0 and "and 2 client(s)" in revoked.stdout, revoked.stderr
    assert call(url + "/v1/task?wait=0", token=a) == (401, "unknown token")  # the running server sees it
    assert call(url + "/v1/task?wait=0", token=b) == (401, "unknown token")
    assert join(url, token) == (403, "this join token was revoked")
    bad = stamen("token", "revoke", "zz", "--state", state)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_status_and_metrics_are_for_the_operator(server):
    url, state = server
    device = join(url, create_token(state, "device"))[1]["token"]
    for path in ("/v1/status", "/metrics"):
        assert call(url + path)[0] == 401
        assert call(url + path, token=device)[0] == 403
        assert call(url + path, token=create_token(state, "admin"))[0] == 200
    refused = stamen("status", url)
    assert refused.returncode == 2 and "401" in refused.stderr and refused.stderr.count("\n") == 1


def test_public_status_shows_aggregates_only(tmp_path):
    with running_server(tmp_path, "[server]\npublic_status = true\n") as (url, state):
        assert join(url, create_token(state, "device"))[0] == 200
        public = stamen("status", url, "--json")
        assert public.returncode == 0, public.stderr
        assert '"client_count": 1' in public.stdout and '"clients": []' in public.stdout
        status, text = call(url + "/metrics")
        assert status == 200 and b"stamen_clients 1" in text and b"client=" not in text
        full = stamen("status", url, "--json", "--token", create_token(state, "admin"))
        assert '"client_id"' in full.stdout


def test_restart_survives_a_client_no_tier_fits(tmp_path):
    """A phone that fits only the phone-low tier joins; the operator then grows that tier past
    its memory. The server starts, says so in one log line, and the client must join again."""
    fed = tmp_path / "fed.toml"
    with running_server(tmp_path, "") as (url, state):
        me = join(url, create_token(state, "device"), memory_bytes=4 << 20)[1]
        assert me["tier"] == "phone-low"
    fed.write_text("[tiers.phone-low]\nbatch_size = 64\n[tiers.phone-high]\nbatch_size = 64\n")
    proc, url = start_server(state, fed)
    try:
        assert call(url + "/v1/task?wait=0", token=me["token"]) == (401, "unknown token")
    finally:
        proc.terminate()
        out = proc.startup + proc.communicate(timeout=60)[0]
    assert f"client {me['client_id']} no longer fits this federation" in out
    assert "Traceback" not in out and clients_in(state) == 0


def test_a_revocation_is_seen_from_the_next_step_of_the_event_loop(tmp_path):
    """On an event loop the server reads auth.db's data version once per step of the loop
    (``Auth._read_version``): a revocation by another process is seen by every request whose
    handler runs after it, i.e. from the next step on; without a loop, by every call."""
    import asyncio

    from stamen.server.auth import Auth, Unauthorized, revoke_token
    join_token = create_token(tmp_path, "device", init=True)
    auth = Auth(tmp_path)
    _, token = auth.join(join_token, {"role": "device"}, time.time())
    prefix = auth.tokens()[0].id

    async def steps():
        assert auth.principal(token).role == "device"
        revoke_token(tmp_path, prefix)  # another connection, as `stamen token revoke` is
        assert auth.principal(token).role == "device"  # the same step: read before the revocation
        await asyncio.sleep(0)
        with pytest.raises(Unauthorized):
            auth.principal(token)

    asyncio.run(steps())
    _, again = Auth(tmp_path).join(create_token(tmp_path, "device"), {"role": "device"}, time.time())
    assert auth.principal(again).role == "device"
    revoke_token(tmp_path, [t for t in auth.tokens() if not t.revoked][0].id)
    with pytest.raises(Unauthorized):  # no loop: read at every call
        auth.principal(again)
    auth.close()
