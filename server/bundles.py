"""The artifact bundles the server hands to devices (``GET /v1/bundles/{plan}/{runtime}``),
published into ``<state>/bundles/<plan hash>/<runtime>/`` on first need.

Exporting is slow (an ExecuTorch program takes tens of seconds even for gpt-tiny) and a
federation may never meet a device that wants a given (plan, runtime), so nothing is exported
at start-up (eight device-tier exports would hold a small server's CPU for minutes): a bundle
is exported when a client first asks for it, and the client waits or retries. Each export runs in its own Python process, one at a time: the event loop
keeps answering, the GIL-heavy tracing does not stall it, the memory the exporter leaves
behind goes away with the process, and a server shutdown can stop it. Concurrent requests for
the same bundle share one job, so it is exported once; the export cache (``mobile_bridge.bundle``,
``$STAMEN_CACHE``) makes a restart or a second federation on the same model cheap. A bundle
already published on disk is verified (checksums, model, plan, runtime) before it is served.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from stamen.core.model import ModelSpec
from stamen.core.plan import Plan
from stamen.core.wire import BUNDLE_RUNTIMES
from stamen.mobile_bridge.bundle import publish_bundle
from stamen.mobile_bridge.manifest import BundleError, read_bundle
from stamen.server.coordinator import RequestError


class BundlePublisher:
    """One export job per (plan hash, runtime), started on demand and remembered: a finished
    job answers at once, a failed one keeps answering its reason (an export that failed
    will fail again; the operator sees why in the server's output)."""

    def __init__(self, spec: ModelSpec, tiers: dict[str, tuple[Plan, int]], seq_len: int, bundles_dir: Path,
                 lora: dict | None = None) -> None:
        """``tiers``: one entry per tier and plan (a rotating tier has several) → (plan, batch
        size). ExecuTorch programs are traced for the tier's
        batch x ``seq_len``; tiers sharing a plan at different batch sizes cannot share one.
        ``lora``: a LoRA federation's adapter space (``LoraSpace.describe()``); its plans'
        bundles carry the frozen base and take only the adapter per version."""
        self.spec, self.seq_len, self.dir, self.lora = spec, seq_len, bundles_dir, lora
        self.shapes: dict[str, tuple[Plan, int | None]] = {}  # plan hash → (plan, batch size or None)
        for plan, batch_size in tiers.values():
            known = self.shapes.get(plan.hash)
            self.shapes[plan.hash] = (plan, batch_size if known is None or known[1] == batch_size else None)
        self.jobs: dict[tuple[str, str], asyncio.Task[Path]] = {}
        self.one_at_a_time = asyncio.Semaphore(1)  # exports share the machine with training servers
        self.exporters: set[asyncio.subprocess.Process] = set()

    def _job(self, plan_hash: str, runtime: str) -> asyncio.Task[Path]:
        """The job that publishes this bundle, started now unless one exists. Refuses an
        unknown plan or runtime and a bundle that cannot be built, with a reason."""
        if runtime not in BUNDLE_RUNTIMES:
            raise RequestError(f"no bundles for runtime {runtime!r}: use one of {', '.join(BUNDLE_RUNTIMES)}", 404)
        if plan_hash not in self.shapes:
            raise RequestError(f"unknown plan {plan_hash!r}", 404)
        if runtime not in self.shapes[plan_hash][0].runtimes:
            raise RequestError(f"plan {plan_hash} trains on {', '.join(self.shapes[plan_hash][0].runtimes)}, not on "
                               f"{runtime} (a LoRA plan's ExecuTorch bundle needs [lora] base = \"fp32\")", 501)
        if runtime == "executorch" and self.shapes[plan_hash][1] is None:
            raise RequestError(f"tiers sharing plan {plan_hash} train at different batch sizes, and an ExecuTorch "
                               "program has one static shape: give them the same batch_size", 501)
        key = (plan_hash, runtime)
        if key not in self.jobs:
            self.jobs[key] = asyncio.create_task(self._publish(plan_hash, runtime))
        return self.jobs[key]

    async def get(self, plan_hash: str, runtime: str, wait_s: float) -> Path:
        """The published bundle folder, waiting up to ``wait_s`` for its export; then 503, which
        clients retry. The wait is shielded: a request that gives up does not cancel the job."""
        job = self._job(plan_hash, runtime)
        try:
            return await asyncio.wait_for(asyncio.shield(job), wait_s)
        except TimeoutError:
            raise RequestError(f"the {runtime} bundle of plan {plan_hash} is being exported: retry shortly",
                               503) from None

    async def _publish(self, plan_hash: str, runtime: str) -> Path:
        folder = self.dir / plan_hash / runtime
        try:
            await asyncio.to_thread(read_bundle, folder, self.spec.hash, plan_hash, runtime)
            return folder
        except BundleError:
            pass  # absent, or left half-written by a crash: export (again)
        plan, batch_size = self.shapes[plan_hash]
        async with self.one_at_a_time:
            start = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "stamen.server.bundles", self.spec.name, plan.to_json(), runtime,
                str(self.dir), str(batch_size or 1), str(self.seq_len), json.dumps(self.lora),  # ORT ignores the shape
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            self.exporters.add(proc)
            try:
                _, err = await proc.communicate()
            finally:
                self.exporters.discard(proc)
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines() or [f"exit status {proc.returncode}"]
            reason = f"cannot export plan {plan_hash} for {runtime}: {lines[-1]}"
            print(f"stamen server: {reason}", flush=True)
            raise RequestError(reason, 501)
        await asyncio.to_thread(read_bundle, folder, self.spec.hash, plan_hash, runtime)
        print(f"stamen server: exported the {runtime} bundle of plan {plan_hash} ({plan.name}) "
              f"in {time.monotonic() - start:.1f} s", flush=True)
        return folder

    def close(self) -> None:
        """Stop running exports (their half-published folders are re-exported on next need)."""
        for proc in self.exporters:
            proc.kill()
        for job in self.jobs.values():
            job.cancel()


def _main(argv: list[str]) -> None:
    model, plan_json, runtime, bundles_dir, batch_size, seq_len, lora = argv
    publish_bundle(ModelSpec(model), Plan.from_json(plan_json), runtime, bundles_dir, int(batch_size), int(seq_len),
                   lora=json.loads(lora))


if __name__ == "__main__":
    _main(sys.argv[1:])
