import asyncio
import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import crash_feeder as cf
from stamen.core.errors import UserError
from stamen.server.aggregator import AggregatorConfig, StaleUpdate
from stamen.server.committer import Committer
from stamen.server.store import Store

# The feeders are forked from a server process that has imported what crash_feeder imports:
# real processes, SIGKILLed as before, without the imports of torch and stamen in each of ~30
# fresh interpreters (2-3 CPU-s each). Named as installed: Python 3.11's forkserver drops the
# test's sys.path, so crash_feeder itself (cheap on top of these) is imported in each child.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["pytest", "torch", "stamen.server.committer", "stamen.server.store"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    agg, st = cf.feed(str(tmp_path_factory.mktemp("ref")))
    st.close()
    return agg


@pytest.fixture(scope="module")
def batched_reference(tmp_path_factory):
    """The uninterrupted run through the group committer, one row per batch."""
    agg, st = cf.feed_batched(str(tmp_path_factory.mktemp("ref")), serial=True)
    st.close()
    return agg


def assert_same_state(agg, ref) -> None:
    assert agg.version == ref.version
    for group in ("weights", "opt_state", "S", "W"):
        a, b = getattr(agg, group), getattr(ref, group)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (group, k)
    assert agg.buffer == ref.buffer and agg.seen == ref.seen
    assert sorted(agg.history) == sorted(ref.history)
    for v in agg.history:
        assert all(torch.equal(agg.history[v][n], ref.history[v][n]) for n in ref.weights)


def run_feeder(root: Path, crash: str | None = None, kill_after_acks: int | None = None,
               delay: float = 0.0, batched: bool = False) -> tuple[int | None, set[str], list[int]]:
    """One feeder process, killed at a point (``crash``) or from outside after some acks:
    (exit code, task ids acknowledged, sizes of the journal batches it committed)."""
    lines, into = FORKS.Pipe(duplex=False)
    proc = FORKS.Process(target=cf.forked, args=(into, str(root), crash or "", batched))
    proc.start()
    into.close()  # the child holds the only writer: its death ends the lines
    acked, batches = set(), []
    with os.fdopen(os.dup(lines.fileno())) as out:
        lines.close()
        for line in out:
            what, value = line.split()
            if what == "batch":
                batches.append(int(value))
                continue
            acked.add(value)
            if kill_after_acks is not None and len(acked) >= kill_after_acks:
                time.sleep(delay)
                proc.kill()
                break
        for line in out:
            what, value = line.split()
            if what == "ack":
                acked.add(value)
    proc.join(60)
    return proc.exitcode, acked, batches


# Each scenario is a list of crashes, one feeder process each; the test then resumes in-process.
SCENARIOS = {
    "between-journal-and-apply": ["submit:5"],
    "inside-a-k-flush-then-again-in-replay": ["flush:2", "submit:3"],
    "max-wait-flush-journaled-not-applied": ["flush:4"],
    "checkpoint-temp-written": ["fsync:3"],
    "first-checkpoint-torn": ["fsync:1"],
    "checkpoint-renamed-payloads-kept": ["replace:4", "fsync:2"],
    "version-file-renamed-checkpoint-not": ["version:1"],
    "version-files-of-two-checkpoints-then-torn": ["version:3", "version:2"],
}


# The same through the group committer (waves of 4 uploads, each wave one batch): kills before a
# batch is committed, after it is committed but before any of it is applied, in the middle of
# applying one, and while a checkpoint is written on its thread as the next batches commit.
BATCHED_SCENARIOS = {
    "before-a-batch-commit": ["write:3"],
    "batch-committed-none-applied": ["written:2", "written:3"],
    "mid-batch-apply": ["submit:6", "submit:3"],
    "max-wait-flush-journaled-not-applied": ["flush:2"],
    "checkpoint-temp-written-while-journal-commits": ["fsync:3"],
    "checkpoint-renamed-payloads-kept": ["replace:3"],
    "version-file-renamed-while-journal-commits": ["version:3"],
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_crash_at_a_point_then_restore_equals_uninterrupted(tmp_path, reference, name):
    acked: set[str] = set()
    for crash in SCENARIOS[name]:
        rc, got, _ = run_feeder(tmp_path, crash=crash)
        assert rc == -signal.SIGKILL, f"{crash} never fired"
        acked |= got
    check_resumed(tmp_path, reference, acked)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", range(3))
def test_crash_at_random_instants_then_restore_equals_uninterrupted(tmp_path, reference, seed):
    rnd = random.Random(seed)
    acked: set[str] = set()
    for _ in range(2):
        rc, got, _ = run_feeder(tmp_path, kill_after_acks=rnd.randint(1, cf.N // 2), delay=rnd.uniform(0, 0.01))
        acked |= got
    check_resumed(tmp_path, reference, acked)


@pytest.mark.timeout(180)
def test_group_commit_equals_one_row_per_commit(tmp_path, batched_reference):
    rc, acked, batches = run_feeder(tmp_path, batched=True)
    assert rc == 0 and len(acked) == cf.N
    assert max(batches) == cf.WAVE  # each wave of uploads was made durable by one commit
    check_resumed(tmp_path, batched_reference, acked, batched=True)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(BATCHED_SCENARIOS))
def test_group_commit_crash_at_a_point_then_restore_equals_uninterrupted(tmp_path, batched_reference, name):
    acked: set[str] = set()
    for crash in BATCHED_SCENARIOS[name]:
        rc, got, _ = run_feeder(tmp_path, crash=crash, batched=True)
        assert rc == -signal.SIGKILL, f"{crash} never fired"
        acked |= got
    check_resumed(tmp_path, batched_reference, acked, batched=True)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", range(2))
def test_group_commit_crash_at_random_instants_then_restore_equals_uninterrupted(tmp_path, batched_reference, seed):
    rnd = random.Random(seed)
    acked: set[str] = set()
    for _ in range(2):
        rc, got, _ = run_feeder(tmp_path, kill_after_acks=rnd.randint(1, cf.N // 2), delay=rnd.uniform(0, 0.01),
                                batched=True)
        acked |= got
    check_resumed(tmp_path, batched_reference, acked, batched=True)


def check_resumed(root: Path, reference, acked: set[str], batched: bool = False) -> None:
    """Resume to the end of the stream: the state equals the uninterrupted run's exactly (an
    update lost or applied twice would change the weights), each update is journaled once and
    in order, and every acknowledged one is among them."""
    agg, st = cf.feed_batched(str(root)) if batched else cf.feed(str(root))
    assert_same_state(agg, reference)
    ids = st.journaled_task_ids()
    assert ids == [f"t{i}" for i in range(cf.N)]
    assert acked <= set(ids)
    st.close()
    fresh = Store(root).restore(cf.CFG, cf.BATCHED if batched else cf.CONFIG)  # a cold restore lands there too
    assert_same_state(fresh, reference)


def test_accept_rejects_before_journaling_and_ignores_resends(tmp_path):
    st = Store(tmp_path, checkpoint_every=1)
    agg = st.start(cf.CFG, cf.initial_weights(), AggregatorConfig(buffer_k=1, tau_max=0))
    st.accept(agg, cf.update_for(0, 0), 0.0)
    assert st.accept(agg, cf.update_for(0, 0), 1.0) is None  # a re-send: no new row
    with pytest.raises(StaleUpdate):
        st.accept(agg, cf.update_for(3, 0), 2.0)  # base 0 is one version behind; τ_max 0
    assert st.journaled_task_ids() == ["t0"] and agg.version == 1
    # two checkpoints are kept (versions 0 and 1): the journal keeps what the older one lacks
    payloads = "SELECT task_id FROM journal WHERE payload IS NOT NULL"
    assert [r for (r,) in st.db.execute(payloads)] == ["t0"]
    st.accept(agg, cf.update_for(3, 1), 3.0)
    # ...and drops it once both kept checkpoints (versions 1 and 2) cover it; its id stays
    assert [r for (r,) in st.db.execute(payloads)] == ["t3"] and st.journaled_task_ids() == ["t0", "t3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ckpt-000000000001.safetensors", "ckpt-000000000002.safetensors"]
    with pytest.raises(UserError, match="settings differ"):
        Store(tmp_path).restore(cf.CFG, AggregatorConfig(buffer_k=2, tau_max=0))
    with pytest.raises(UserError, match="no checkpoint"):
        Store(tmp_path / "empty").restore(cf.CFG, cf.CONFIG)


def test_a_wait_cancelled_while_its_row_commits_leaves_the_row_to_the_committer(tmp_path):
    """A request's timeout cancels its wait on its row, never the row's future: the row is still
    made durable and applied, whoever else waits on it (a re-sent upload) gets its result, and
    the cancelled request sees its cancellation once the row is applied."""
    st = Store(tmp_path, checkpoint_every=1000)
    agg = st.start(cf.CFG, cf.initial_weights(), cf.BATCHED)

    async def main() -> None:
        committer = Committer(st, agg)
        row = st.row(cf.update_for(0, 0), 0.0)

        def apply() -> str:
            st.apply(agg, row)
            return "applied"

        done = committer.commit(row, apply)

        async def request() -> str:
            return await done

        waiting = asyncio.create_task(request())
        await asyncio.sleep(0)  # the request now waits on the row
        waiting.cancel()
        assert not done.cancelled() and not waiting.done()
        assert await done == "applied"
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await committer.drain()
        committer.close()

    asyncio.run(main())
    assert st.journaled_task_ids() == ["t0"] and "t0" in agg.seen


def version_files(root: Path) -> dict[str, int]:
    """The version files of a store's checkpoints, name → inode (a rewrite gives a new inode)."""
    return {p.name: p.stat().st_ino for p in (root / "checkpoints" / "versions").glob("*.safetensors")}


def manifests(root: Path) -> list[dict[int, str]]:
    """Each kept checkpoint's map of the older versions it holds to their files, newest first."""
    out = []
    for path in sorted((root / "checkpoints").glob("ckpt-*.safetensors"), reverse=True):
        with safe_open(str(path), framework="pt") as f:
            out.append({int(v): name for v, name in json.loads(f.metadata()["versions"]).items()})
    return out


def test_each_kept_version_is_written_once_and_deleted_with_the_last_checkpoint_naming_it(tmp_path):
    config = AggregatorConfig(buffer_k=1, tau_max=3)
    st = Store(tmp_path, checkpoint_every=2)
    agg = st.start(cf.CFG, cf.initial_weights(), config)
    seen: dict[str, int] = {}
    for i in range(11):
        st.accept(agg, cf.update_for(i, agg.version), float(i))  # K = 1: a version each, a checkpoint every 2
        files = version_files(tmp_path)
        assert all(seen[n] == ino for n, ino in files.items() if n in seen)  # never written again
        seen |= files
        kept = manifests(tmp_path)
        held = agg.version - agg.version % 2  # the newest checkpoint's version
        assert sorted(kept[0]) == list(range(max(0, held - 3), held))  # every kept older version, in a file
        assert set(files) == {name for m in kept for name in m.values()}  # and no other file
    assert len(seen) == 5  # one file per checkpoint that held new versions (at 2, 4, 6, 8, 10)
    assert_same_state(Store(tmp_path).restore(cf.CFG, config), agg)


def test_a_checkpoint_of_format_1_is_still_read_and_the_next_writes_its_versions_once(tmp_path):
    """Format 1 held every kept version inline, in one file without a ``format`` key."""
    config = AggregatorConfig(buffer_k=1, tau_max=3)
    st = Store(tmp_path, checkpoint_every=1)
    agg = st.start(cf.CFG, cf.initial_weights(), config)
    for i in range(6):
        st.accept(agg, cf.update_for(i, agg.version), float(i))
    newest, older = sorted((tmp_path / "checkpoints").glob("ckpt-*.safetensors"), reverse=True)
    with safe_open(str(newest), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("format", "versions")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for v, name in manifests(tmp_path)[0].items():
        with safe_open(str(tmp_path / "checkpoints" / "versions" / name), framework="pt") as f:
            tensors |= {f"hist/{k}": f.get_tensor(k) for k in f.keys() if k.startswith(f"{v}/")}
    older.unlink()
    shutil.rmtree(tmp_path / "checkpoints" / "versions")
    save_file(tensors, newest, metadata=meta)
    st.close()
    st = Store(tmp_path, checkpoint_every=1)
    resumed = st.restore(cf.CFG, config)
    assert_same_state(resumed, agg)
    st.accept(resumed, cf.update_for(6, resumed.version), 6.0)
    first = resumed.version - 3
    assert list(version_files(tmp_path)) == [f"{first:012d}-{first + 2:012d}.safetensors"]  # all three at once
    update = cf.update_for(6, agg.version)
    agg.check(update)
    agg.submit(update, 6.0)  # the state that went on without a restart
    assert_same_state(resumed, agg)
    assert_same_state(Store(tmp_path).restore(cf.CFG, config), agg)


def test_a_checkpoint_of_a_newer_format_stops_with_one_line_and_is_left_as_it_is(tmp_path):
    st = Store(tmp_path, checkpoint_every=1)
    agg = st.start(cf.CFG, cf.initial_weights(), cf.CONFIG)
    path = st.checkpoint(agg)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata() | {"format": "3"}, {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata=meta)
    with pytest.raises(UserError, match="format 3, newer than this stamen reads"):
        Store(tmp_path).restore(cf.CFG, cf.CONFIG)
    assert path.is_file()
