"""The edge client: probe, join, then task → weights → train → upload, until the budget ends.

The data never leaves the machine: only the pseudo-gradient Δ = θ_base − θ_local of the
plan's trainable tensors goes up, encoded with the task's codec and the client's error-feedback
residual (kept per plan, saved in the state folder). Weights come down exact, as a difference
from the last version this client holds when the server still keeps it. A gpu-role client
keeps its inner AdamW state across tasks (DiLoCo/Photon). Network failures and server restarts
are ridden out by the session's retries; an upload is idempotent by task id.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch
from tqdm import tqdm

from stamen.compression.codecs import decode
from stamen.compression.feedback import ErrorFeedback
from stamen.core.data import Shard, load_corpus
from stamen.core.errors import UserError
from stamen.core.model import ModelSpec
from stamen.core.records import Task
from stamen.core.train import default_device
from stamen.edge_client.probe import capabilities, measure_flops, probe
from stamen.edge_client.runtime import Runtime, TorchRuntime
from stamen.edge_client.session import ServerRefused, Session

RUNTIMES = ("torch",)  # the ort/executorch runtimes plug in here with the export issue
LONG_POLL_S = 30


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
    upload_bytes: int
    outcome: str  # "accepted", "duplicate", "stale", "lapsed"
    version: int  # the server's version after the upload


@dataclass
class EdgeClient:
    server: str
    token: str  # a join token (first run) — the client token is then kept in state_dir
    data: str  # a folder of text files, a .jsonl file, or "stdlib"
    runtime: str = "auto"
    role: str = "device"
    max_memory: int | None = None
    budget_minutes: float | None = None
    state_dir: str | Path | None = None  # credentials and error-feedback residuals
    max_tasks: int | None = None
    progress: bool = True
    ca_file: str | None = None
    log: list[TaskLog] = field(default_factory=list)

    def run(self) -> list[TaskLog]:
        return asyncio.run(self.run_async())

    async def run_async(self) -> list[TaskLog]:
        if self.runtime not in ("auto", *RUNTIMES):
            raise UserError(f"runtime {self.runtime!r} is not available in this client: use auto or torch")
        corpus = load_corpus(self.data)
        shard = Shard(corpus, corpus.doc_bounds)
        state = Path(self.state_dir) if self.state_dir else None
        if state:
            state.mkdir(parents=True, exist_ok=True)
        ef_path = state / "residuals.safetensors" if state else None
        ef = ErrorFeedback.load(ef_path) if ef_path and ef_path.exists() else ErrorFeedback()
        session = Session(self.server, ca_file=self.ca_file)
        try:
            me = await self._join(session, state)
            session.token = me["token"]
            cfg = ModelSpec(me["model"]).gpt_config()
            self._say(f"joined {self.server} as {me['client_id']} ({self.role}, tier {me['tier']})")
            stop_at = time.time() + 60 * self.budget_minutes if self.budget_minutes else None
            runtimes: dict[str, Runtime] = {}
            held: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}  # plan hash → (version, weights)
            while (self.max_tasks is None or len(self.log) < self.max_tasks) and (stop_at is None or time.time() < stop_at):
                answer = await session.call("GET", "/v1/task", params={"wait": LONG_POLL_S})
                if answer is None:
                    continue
                task = Task.from_dict(answer["task"])
                if task.plan.hash not in runtimes:
                    runtimes[task.plan.hash] = TorchRuntime(cfg, task.plan, default_device(),
                                                            keep_optimizer=self.role == "gpu")
                sub = await self._weights(session, task, held)
                held[task.plan.hash] = (task.base_version, sub)
                self.log.append(await self._train_and_upload(session, task, runtimes[task.plan.hash],
                                                             sub, shard, ef, me["tier"]))
                if ef_path:
                    ef.save(ef_path)
        finally:
            await session.close()
        return self.log

    async def _join(self, session: Session, state: Path | None) -> dict:
        """Join once; later runs reuse the saved client token for the same server."""
        saved = state / "client.json" if state else None
        if saved and saved.exists():
            me = json.loads(saved.read_text())
            if me.get("server") == self.server:
                return me
        hw = probe()
        flops = measure_flops(default_device())
        caps = capabilities(hw, self.role, RUNTIMES, flops, self.max_memory)
        try:
            me = await session.call("POST", "/v1/join", {"join_token": self.token, "capabilities": caps.to_dict()})
        except ServerRefused as e:
            raise UserError(f"cannot join {self.server}: {e.reason}") from None
        me["server"] = self.server
        if saved:
            saved.write_text(json.dumps(me))
        return me

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
        payload = decode(data)
        if payload.kind == "delta":
            return {n: have[1][n] + d for n, d in payload.tensors.items()}
        return payload.tensors

    async def _train_and_upload(self, session: Session, task: Task, rt: Runtime, sub: dict[str, torch.Tensor],
                                shard: Shard, ef: ErrorFeedback, tier: str) -> TaskLog:
        rt.set_weights(sub)
        bar = tqdm(total=task.steps, desc=f"{task.task_id} v{task.base_version}", disable=not self.progress,
                   leave=False, unit="step")

        def on_step(_: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        # Training is compute-bound: run it off the event loop so the connection pool stays alive.
        result = await asyncio.to_thread(rt.train, shard.batches(task.batch_size, task.seq_len, task.seed),
                                         task.steps, task.train, task.step_offset, on_step)
        bar.close()
        trained = rt.trained_weights()
        delta = {n: sub[n].to(torch.float32) - t for n, t in trained.items()}
        body = ef.encode(task.plan.hash, delta, task.codec, kind="update",
                         meta={"tokens": result.tokens, "loss": result.mean_loss})
        try:
            _, data = await session.request("POST", f"/v1/updates/{task.task_id}", body)
            answer = msgpack.unpackb(data, raw=False)
            outcome, version = answer["status"], answer["version"]
        except ServerRefused as e:
            if e.status not in (409, 410):
                raise
            outcome, version = ("stale" if e.status == 409 else "lapsed"), -1
        log = TaskLog(task.task_id, task.base_version, tier, result.steps, result.tokens, result.losses[0],
                      result.losses[-1], len(body), outcome, version)
        self._say(f"{task.task_id}: v{task.base_version} {task.plan.name} {result.steps} steps, loss "
                  f"{log.first_loss:.3f}→{log.last_loss:.3f}, {len(body) / 1024:.1f} KiB up: {outcome}")
        return log

    def _say(self, line: str) -> None:
        if self.progress:
            tqdm.write(line)


def run_client(server: str, token: str, data: str, runtime: str = "auto", role: str = "device",
               max_memory: int | None = None, budget_minutes: float | None = None,
               state_dir: str | Path | None = None) -> list[TaskLog]:
    """``stamen client``: train for the server until the budget ends (or forever)."""
    return EdgeClient(server, token, data, runtime, role, max_memory, budget_minutes, state_dir).run()
