"""The edge client: probe, join, then task → weights → train → upload, until the budget ends.

The data never leaves the machine: only the pseudo-gradient Δ = θ_base − θ_local of the
plan's trainable tensors goes up, encoded with the task's codec and the client's error-feedback
residual (kept per plan, saved in the state folder). Weights come down exact, as a difference
from the last version this client holds when the server still keeps it. A gpu-role client
keeps its inner AdamW state across tasks (DiLoCo/Photon). Network failures and server restarts
are ridden out by the session's retries; an upload is idempotent by task id.

A task names its runtime (the first of the client's declared runtimes the server supports).
For ``ort`` and ``executorch`` the client trains the plan's artifact bundle, downloaded once
into its cache and verified (checksums, model, plan, runtime) before every load, as a phone app
would; only weights then travel per version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from stamen.compression.downlink import decode_download
from stamen.compression.feedback import ErrorFeedback
from stamen.core.data import Shard, load_corpus
from stamen.core.errors import UserError
from stamen.core.instruct import base_encoding, load_instructions
from stamen.core.lora import LoraSpace, described_space
from stamen.core.model import ModelSpec
from stamen.core.plan import Model
from stamen.core.records import Capabilities, Task
from stamen.core.train import default_device
from stamen.core.wire import LONG_POLL_S, RUNTIMES
from stamen.edge_client.bundle_runtime import available_runtimes
from stamen.edge_client.executorch_runtime import ExecuTorchRuntime
from stamen.edge_client.ort_runtime import OrtRuntime
from stamen.edge_client.probe import capabilities, measure_flops, probe
from stamen.edge_client.runtime import Batches, Runtime, TorchRuntime
from stamen.edge_client.session import ServerRefused, Session
from stamen.mobile_bridge.manifest import BundleError, read_bundle

BUNDLE_TRAINERS = {"ort": OrtRuntime, "executorch": ExecuTorchRuntime}
RELEASE_TIMEOUT_S = 5.0  # how long a stopping client tries to give its open task back
log = logging.getLogger(__name__)


def declared_runtimes(runtime: str, role: str, cuda: bool) -> tuple[str, ...]:
    """What the client declares at join, preferred first; the server gives each task the first
    one it supports. ``auto``: every runtime this machine has, fastest first
    (``available_runtimes``), except that a gpu-role client puts eager torch first: only it keeps
    the inner AdamW state across tasks, as DiLoCo's workers do. An explicit runtime is declared
    alone, and refused if this machine lacks it."""
    have = available_runtimes(cuda)
    if runtime == "auto":
        return ("torch", *(r for r in have if r != "torch")) if role == "gpu" else have
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}: use auto, {', '.join(RUNTIMES)}")
    if runtime not in have:
        raise UserError(f"runtime {runtime!r} is not installed on this machine (available: {', '.join(have)})")
    return (runtime,)


@dataclass
class TaskLog:
    """What happened to one task, for the caller and the tests."""

    task_id: str
    base_version: int
    tier: str
    steps: int
    tokens: int
    first_loss: float
    last_loss: float
    mean_loss: float  # over the task's steps: what the task line shows (single batches are noisy)
    upload_bytes: int
    outcome: str  # "accepted", "duplicate", "stale", "lapsed"
    version: int  # the server's version after the upload
    runtime: str
    bundle_downloads: int  # bundle downloads this task needed (0: cached, or torch)


@dataclass
class EdgeClient:
    server: str
    token: str  # a join token (first run) — the client token is then kept in state_dir
    data: str  # a folder of text files, a .jsonl file, or "stdlib"
    runtime: str = "auto"
    role: str = "device"
    max_memory: int | None = None
    budget_minutes: float | None = None
    state_dir: str | Path | None = None  # credentials, error-feedback residuals, bundles
    max_tasks: int | None = None
    progress: bool = True
    ca_file: str | None = None
    # A fresh runtime per task, made by the caller: the Flower gateway's runtime hands the task
    # to a Flower node, which needs the task's own settings (batch, seed), not just its plan,
    # and trains on the node's text: with a factory the client reads no text of its own.
    runtime_factory: Callable[[ModelSpec, Task], Runtime] | None = None
    # What to declare at join instead of probing this machine: the Flower gateway declares
    # its node's hardware, where the training runs.
    capabilities: Capabilities | None = None
    log: list[TaskLog] = field(default_factory=list)

    def run(self) -> list[TaskLog]:
        """Train until done; Ctrl-C stops within a training step (the open task's update is not
        sent, and the log says so) and raises KeyboardInterrupt."""
        with logging_redirect_tqdm() if self.progress else nullcontext():
            return asyncio.run(self.run_async())

    async def run_async(self) -> list[TaskLog]:
        declared = declared_runtimes(self.runtime, self.role, torch.cuda.is_available())
        if self.data != "stdlib" and not Path(self.data).expanduser().exists():  # before joining: a typo changes nothing
            raise UserError(f"data not found: {self.data}")
        state = Path(self.state_dir) if self.state_dir else None
        if state:
            state.mkdir(parents=True, exist_ok=True)
        ef_path = state / "residuals.safetensors" if state else None
        ef = ErrorFeedback.load(ef_path) if ef_path and ef_path.exists() else ErrorFeedback()
        scratch = None if state else tempfile.TemporaryDirectory(prefix="stamen-bundles-")
        bundles = state / "bundles" if state else Path(scratch.name)
        session = Session(self.server, ca_file=self.ca_file)
        started = time.monotonic()
        try:
            me = await self._join(session, state, declared)
            session.token = me["token"]
            spec = ModelSpec(me["model"])
            cfg, batches = self._model_and_data(spec, me.get("lora"))
            log.info(f"joined {self.server} as {me['client_id']} ({self.role}, tier {me['tier']}, "
                      f"runtimes {', '.join(declared)})")
            stop_at = time.time() + 60 * self.budget_minutes if self.budget_minutes else None
            runtimes: dict[tuple[str, str], Runtime] = {}  # (plan hash, runtime) → loaded runtime
            held: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}  # plan hash → (version, weights)
            given: Task | None = None  # the next task, when the last upload's answer carried one
            while (self.max_tasks is None or len(self.log) < self.max_tasks) and (stop_at is None or time.time() < stop_at):
                if given is None:
                    answer = await session.call("GET", "/v1/task", params={"wait": LONG_POLL_S})
                    if answer is None:
                        continue
                    task = Task.from_dict(answer["task"])
                else:
                    task, given = given, None
                key, downloads = (task.plan.hash, task.runtime), 0
                if self.runtime_factory is not None:
                    runtimes[key] = self.runtime_factory(spec, task)
                elif key not in runtimes:
                    if task.runtime == "torch":
                        runtimes[key] = TorchRuntime(cfg, task.plan, default_device(), keep_optimizer=self.role == "gpu",
                                                     base=spec.build() if isinstance(cfg, LoraSpace) else None)
                    else:
                        folder, downloads = await self._bundle(session, task, spec.hash, bundles)
                        runtimes[key] = BUNDLE_TRAINERS[task.runtime](folder, spec.hash, task.plan.hash)
                try:
                    sub = await self._weights(session, task, held)
                    held[task.plan.hash] = (task.base_version, sub)
                    more = self.max_tasks is None or len(self.log) + 1 < self.max_tasks
                    entry, given = await self._train_and_upload(session, task, runtimes[key], sub, batches, ef,
                                                                me["tier"], downloads, more)
                    self.log.append(entry)
                except BaseException:  # stopped (cancelled, Ctrl-C) or failed with the task open
                    await self._release(session, task)
                    raise
                if ef_path:
                    ef.save(ef_path)
            if given is not None:  # the time budget ran out with a next task in hand
                await self._release(session, given)
        finally:
            await session.close()
            if scratch:
                scratch.cleanup()
            if self.log:
                log.info(self.summary(time.monotonic() - started))
        return self.log

    def _model_and_data(self, spec: ModelSpec, lora: dict | None) -> tuple[Model, Callable[[Task], Batches]]:
        """The global model's shapes and the task's batch stream: a GPT and its text; or, when
        the federation fine-tunes with LoRA, the adapter space over this client's copy of the
        base (``hf:PATH`` must be on this machine: only adapters travel) and instruction data
        (``stdlib``: the built-in set's training split, or a JSONL file) in the base's tokens."""
        if lora is None and self.runtime_factory is not None:
            return spec.gpt_config(), lambda t: iter(())  # the caller's runtime trains on its own text (a Flower node's)
        if lora is None:
            corpus = load_corpus(self.data)
            shard = Shard(corpus, corpus.doc_bounds)
            return spec.gpt_config(), lambda t: shard.batches(t.batch_size, t.seq_len, t.seed)
        space = described_space(spec.build(weights=False), lora)
        examples = load_instructions(self.data)
        if self.data == "stdlib":
            examples = examples.split()[0]  # the held-out split is the server's to score on
        encode, eos = base_encoding(spec.name)
        fits: set[int] = set()

        def batches(t: Task) -> Batches:
            if t.seq_len not in fits:  # a window the prompts fill would train nothing: say so, once
                examples.check_fits(t.seq_len, encode)
                fits.add(t.seq_len)
            return examples.batches(t.batch_size, t.seq_len, t.seed, encode, eos)

        return space, batches

    def summary(self, wall_s: float) -> str:
        """The one line a client leaves at exit: what it contributed."""
        outcomes: dict[str, int] = {}
        for t in self.log:
            outcomes[t.outcome] = outcomes.get(t.outcome, 0) + 1
        told = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
        return (f"done: {len(self.log)} task{'s' * (len(self.log) != 1)} ({told}), "
                f"{sum(t.tokens for t in self.log):,} tokens, {sum(t.upload_bytes for t in self.log) / 2**20:.1f} MiB up, "
                f"mean loss {self.log[-1].mean_loss:.3f} in the last task, {wall_s / 60:.1f} min")

    async def _join(self, session: Session, state: Path | None, runtimes: tuple[str, ...]) -> dict:
        """Join once; later runs reuse the saved client token for the same server and the same
        declared runtimes (the server schedules by what was declared: other runtimes join anew)."""
        saved = state / "client.json" if state else None
        if saved and saved.exists():
            me = json.loads(saved.read_text())
            if me.get("server") == self.server and tuple(me.get("runtimes", ())) == runtimes:
                return me
        caps = self.capabilities or capabilities(probe(), self.role, runtimes, measure_flops(default_device()),
                                                 self.max_memory)
        try:
            me = await session.call("POST", "/v1/join", {"join_token": self.token, "capabilities": caps.to_dict()})
        except ServerRefused as e:
            raise UserError(f"cannot join {self.server}: {e.reason}") from None
        me["server"], me["runtimes"] = self.server, list(runtimes)
        if saved:
            saved.write_text(json.dumps(me))
        return me

    async def _bundle(self, session: Session, task: Task, spec_hash: str, cache: Path) -> tuple[Path, int]:
        """The verified bundle folder of the task's plan and runtime, and how many downloads it
        took. A cached copy that fails verification (corrupt, incomplete, for another model or
        plan) is refused with its reason, deleted and downloaded again; a fresh download that
        fails too is the server's fault and stops the client with that reason."""
        folder = cache / f"{task.plan.hash}-{task.runtime}"
        if folder.is_dir():
            try:
                read_bundle(folder, spec_hash, task.plan.hash, task.runtime)
                return folder, 0
            except BundleError as e:
                log.warning(f"refused the cached bundle: {e}; downloading it again")
                shutil.rmtree(folder)
        base = f"/v1/bundles/{task.plan.hash}/{task.runtime}"
        listing = (await session.call("GET", base))["files"]
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        for name in listing:
            if Path(name).name != name:
                raise BundleError(f"the server listed a bundle file outside the bundle: {name!r}")
            _, data = await session.request("GET", f"{base}/{name}")
            (part / name).write_bytes(data)
        part.rename(folder)
        read_bundle(folder, spec_hash, task.plan.hash, task.runtime)
        return folder, 1

    async def _weights(self, session: Session, task: Task, held: dict) -> dict[str, torch.Tensor]:
        """The task's base version of the plan's weights, as a delta from what we hold if we can."""
        have = held.get(task.plan.hash)
        if have is not None and have[0] == task.base_version:
            return have[1]
        params = {"plan": task.plan.hash}
        if have is not None:
            params["have"] = have[0]
        try:
            _, data = await session.request("GET", f"/v1/weights/{task.base_version}", params=params)
        except ServerRefused as e:
            if "have" not in params or e.status != 410:
                raise
            del params["have"]  # the version we hold is no longer kept: take the whole slice
            _, data = await session.request("GET", f"/v1/weights/{task.base_version}", params=params)
        if have is None:
            return decode_download(data)[1]
        return decode_download(data, base=have[1], base_version=have[0])[1]  # whole weights ignore the base

    async def _train_and_upload(self, session: Session, task: Task, rt: Runtime, sub: dict[str, torch.Tensor],
                                batches: Callable[[Task], Batches], ef: ErrorFeedback, tier: str,
                                downloads: int, more: bool) -> tuple[TaskLog, Task | None]:
        """Train, upload, and log the outcome; with ``more`` the upload asks for the next task
        in its answer (``?next=1``: one request per cycle instead of two), which is returned."""
        rt.set_weights(sub)
        bar = tqdm(total=task.steps, desc=f"{task.task_id} v{task.base_version}", disable=not self.progress,
                   leave=False, unit="step")
        stop, done = threading.Event(), [0]

        def on_step(_: int, loss: float) -> None:
            if stop.is_set():
                raise _Stopped
            done[0] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        # Training is compute-bound: run it off the event loop so the connection pool stays alive.
        try:
            result = await asyncio.to_thread(rt.train, batches(task),
                                             task.steps, task.train, task.step_offset, on_step)
        except asyncio.CancelledError:  # Ctrl-C: the thread stops at its next step
            stop.set()
            bar.close()
            log.warning(f"interrupted: task {task.task_id} stopped after {done[0]} of {task.steps} steps; its update "
                        "is not sent")
            raise
        bar.close()
        trained = rt.trained_weights()
        delta = {n: sub[n].to(torch.float32) - t for n, t in trained.items()}
        body = ef.encode(task.plan.hash, delta, task.codec, kind="update",
                         meta={"tokens": result.tokens, "loss": result.mean_loss})
        given = None
        try:
            _, data = await session.request("POST", f"/v1/updates/{task.task_id}", body, {"next": 1} if more else None)
            answer = msgpack.unpackb(data, raw=False)
            outcome, version = answer["status"], answer["version"]
            given = Task.from_dict(answer["task"]) if "task" in answer else None
        except ServerRefused as e:
            if e.status not in (409, 410):
                raise
            outcome, version = ("stale" if e.status == 409 else "lapsed"), -1
        entry = TaskLog(task.task_id, task.base_version, tier, result.steps, result.tokens, result.losses[0],
                        result.losses[-1], result.mean_loss, len(body), outcome, version, task.runtime, downloads)
        log.info(f"task {task.task_id}: v{task.base_version} {task.plan.name} on {task.runtime}, {result.steps} steps, "
                 f"mean loss {entry.mean_loss:.3f}, {len(body) / 1024:.1f} KiB up: {outcome}"
                 + (f" (server at v{version})" if version >= 0 else ""))
        return entry, given

    async def _release(self, session: Session, task: Task) -> None:
        """Give an unfinished task back, so the server hands its work out now rather than at
        its deadline. One short try: a client that stops must not hang on a dead server."""
        try:
            answer = await asyncio.wait_for(session.call("DELETE", f"/v1/tasks/{task.task_id}"), RELEASE_TIMEOUT_S)
            log.info(f"task {task.task_id}: given back to the server ({answer['status']})")
        except (Exception, asyncio.CancelledError) as e:
            log.warning(f"task {task.task_id}: could not give it back ({e or type(e).__name__}); "
                        "it lapses at its deadline")


class _Stopped(Exception):
    """Raised inside the training thread at the first step after Ctrl-C."""


def run_client(server: str, token: str, data: str, runtime: str = "auto", role: str = "device",
               max_memory: int | None = None, budget_minutes: float | None = None,
               state_dir: str | Path | None = None, max_tasks: int | None = None,
               ca_file: str | None = None, progress: bool = True) -> list[TaskLog]:
    """``stamen client``: train for the server until the budget or the task count ends (or forever)."""
    if ca_file is not None and not Path(ca_file).is_file():
        raise UserError(f"CA file not found: {ca_file}")
    return EdgeClient(server, token, data, runtime, role, max_memory, budget_minutes, state_dir, max_tasks,
                      progress=progress, ca_file=ca_file).run()
