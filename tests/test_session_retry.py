"""The client's retry policy against a real aiohttp server on loopback: a server that always
answers 500 is given up on with its reason after ``max_server_errors`` re-sends, while a 503
(a restarting server or its proxy) is ridden out."""

import asyncio

import pytest
from aiohttp import web

from stamen.core.errors import UserError
from stamen.edge_client.session import RetryPolicy, Session


async def serve(answers: list[int]) -> tuple[web.AppRunner, str, list[int]]:
    """A server answering the given statuses in turn (then 200); returns what it answered."""
    seen: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        status = answers[len(seen)] if len(seen) < len(answers) else 200
        seen.append(status)
        return web.json_response({"error": f"boom {len(seen)}"}, status=status)

    app = web.Application()
    app.router.add_get("/x", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", seen


async def attempt(answers: list[int]) -> tuple[int | Exception, list[int]]:
    runner, url, seen = await serve(answers)
    session = Session(url, retry=RetryPolicy(base_s=0.001, cap_s=0.002, max_server_errors=3))
    try:
        status, _ = await session.request("GET", "/x")
        return status, seen
    except UserError as e:
        return e, seen
    finally:
        await session.close()
        await runner.cleanup()


def test_a_server_fault_is_retried_a_bounded_number_of_times():
    result, seen = asyncio.run(attempt([500] * 100))
    assert isinstance(result, UserError) and seen == [500] * 4  # the first answer and 3 re-sends
    assert "failed 4 times on GET /x (500): boom 4" in str(result)


@pytest.mark.parametrize("answers", [[503] * 8, [500, 502, 500, 504, 500]])
def test_transient_answers_are_ridden_out(answers):
    result, seen = asyncio.run(attempt(answers))
    assert result == 200 and seen == answers + [200]
