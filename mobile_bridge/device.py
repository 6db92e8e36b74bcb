"""A runtime-only reference device: trains for a stamen server the way a phone app would.

It speaks only the documented HTTP protocol (``openapi.yaml``), downloads the artifact bundle
of its task's plan, trains it with ONNX Runtime Training or ExecuTorch, and uploads the
pseudo-gradient as a plain ``fp32+zstd`` wire frame. It never imports stamen's model or plan
code (a test checks ``sys.modules``): everything it knows about the submodel comes from the
bundle's manifest, so an app in Kotlin or Swift can do the same with the same files.
``stamen device-emulator`` runs it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch

from stamen.core.data import Shard, load_corpus
from stamen.core.errors import UserError
from stamen.core.instruct import EOS_BYTE, encode_bytes, load_instructions
from stamen.core.train import TrainConfig
from stamen.core.wire import BUNDLE_RUNTIMES, LONG_POLL_S, WEIGHTS_CODEC, Frame, Limits, TensorRecord, decode_frame, encode_frame
from stamen.mobile_bridge.loop import train_loop
from stamen.mobile_bridge.manifest import BundleError, Manifest, read_bundle

log = logging.getLogger(__name__)
UPLOAD_CODEC, UPLOAD_ZSTD = WEIGHTS_CODEC, 1  # the device writes the lossless frame it reads
RETRIES = 8  # a phone app backs off through a server restart or a first bundle export (~20 s)
RETRY_STATUS = (502, 503, 504)


def plan_hash(plan: dict) -> str:
    """A plan's identity as the server computes it (sha256 of its blocks, width and train
    patterns; of a LoRA plan's record less its name): it names the plan's bundle and weights.
    Kept in step with ``Plan.hash`` and ``LoraPlan.hash`` by tests."""
    if plan.get("kind") == "lora":
        ident = {k: v for k, v in plan.items() if k != "name"}
    else:
        ident = {"blocks": list(plan["blocks"]), "width": float(plan["width"]), "train": list(plan["train"])}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def bundle_encoding(folder: Path, manifest: Manifest) -> tuple[Callable[[str], list[int]], int]:
    """(encode, end id) of a LoRA bundle's base: the tokenizer the bundle carries (read with
    the ``tokenizers`` library, as an app would with its bindings), or bytes for a byte-level base."""
    if "tokenizer.json" not in manifest.files:
        return encode_bytes, EOS_BYTE
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
    eos_id = tok.token_to_id(eos["content"] if isinstance(eos, dict) else eos) if eos else None
    if eos_id is None:
        raise BundleError(f"bundle {folder}: its tokenizer names no end token")
    return (lambda text: tok.encode(text).ids), eos_id


class HttpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status, self.reason = status, reason


@dataclass
class DeviceLog:
    task_id: str
    plan: str
    steps: int
    first_loss: float
    last_loss: float
    mean_loss: float
    outcome: str  # "accepted", "duplicate", "stale", "lapsed"
    bundle_downloads: int


@dataclass
class ReferenceDevice:
    server: str
    join_token: str
    runtime: str  # "ort" or "executorch"
    data: str  # a folder of text files, a .jsonl file, or "stdlib" (a LoRA federation: instructions)
    cache_dir: str | Path  # downloaded bundles, one folder per (plan, runtime)
    memory_bytes: int = 8 << 20
    max_tasks: int | None = None
    token: str = ""
    log: list[DeviceLog] = field(default_factory=list)
    reached: bool = False  # has the server answered once? Before that a connection error is final

    # --- HTTP -----------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: bytes | None = None, params: dict | None = None) -> tuple[int, bytes]:
        url = self.server.rstrip("/") + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        req = urllib.request.Request(url, data=body, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            req.add_header("Content-Type", "application/msgpack")
        for attempt in itertools.count():
            try:
                with urllib.request.urlopen(req, timeout=LONG_POLL_S + 30) as r:
                    self.reached = True
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                self.reached = True
                raw = e.read()
                try:
                    reason = json.loads(raw)["error"]
                except (ValueError, KeyError, TypeError):
                    reason = raw[:200].decode(errors="replace")
                if e.code not in RETRY_STATUS or attempt == RETRIES:
                    raise HttpError(e.code, reason) from None
                why = f"HTTP {e.code}: {reason}"
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                why = _why(e)
                if not self.reached:
                    raise UserError(f"cannot reach {self.server}: {why}") from None
                if attempt == RETRIES:
                    raise UserError(f"server {self.server} unreachable after {RETRIES + 1} attempts "
                                    f"(last: {why}); giving up") from None
            delay = min(30.0, 0.5 * 2 ** attempt)  # a bundle export or a server restart: back off
            log.warning(f"{method} {path}: {why}; retry {attempt + 1} of {RETRIES} in {delay:.1f} s")
            time.sleep(delay)

    # --- the protocol -----------------------------------------------------------------------
    def join(self) -> dict:
        caps = {"role": "device", "memory_bytes": self.memory_bytes, "flops": 1e9, "runtimes": [self.runtime]}
        try:
            _, raw = self._call("POST", "/v1/join", msgpack.packb({"join_token": self.join_token, "capabilities": caps}))
        except HttpError as e:
            raise UserError(f"cannot join {self.server}: {e.reason}") from None
        me = msgpack.unpackb(raw, raw=False)
        self.token = me["token"]
        return me

    def bundle(self, plan: str) -> tuple[Path, int]:
        """The verified bundle folder of ``plan`` for this device's runtime and how many
        downloads it took: a cached copy that fails verification (corrupt, incomplete, for
        another plan) is refused, deleted and downloaded again, once."""
        folder = Path(self.cache_dir) / f"{plan}-{self.runtime}"
        downloads = 0
        for attempt in range(2):
            if folder.is_dir():
                try:
                    read_bundle(folder, plan_hash=plan, runtime=self.runtime)
                    return folder, downloads
                except BundleError:
                    if attempt:
                        raise
                    shutil.rmtree(folder)
            self._download(plan, folder)
            downloads += 1
        read_bundle(folder, plan_hash=plan, runtime=self.runtime)
        return folder, downloads

    def _download(self, plan: str, folder: Path) -> None:
        _, raw = self._call("GET", f"/v1/bundles/{plan}/{self.runtime}")
        listing = msgpack.unpackb(raw, raw=False)["files"]
        tmp = folder.with_name(folder.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in listing:
            if Path(name).name != name:
                raise BundleError(f"server listed a bundle file outside the bundle: {name!r}")
            _, data = self._call("GET", f"/v1/bundles/{plan}/{self.runtime}/{name}")
            (tmp / name).write_bytes(data)
        tmp.rename(folder)

    def weights(self, version: int, plan: str, manifest: Manifest) -> dict[str, torch.Tensor]:
        """The plan's weights of ``version``, checked against the manifest's names and shapes."""
        _, raw = self._call("GET", f"/v1/weights/{version}", params={"plan": plan})
        shapes = {s.name: tuple(s.shape) for s in manifest.params}
        frame = decode_frame(raw, Limits(max_tensors=len(shapes), manifest=shapes))
        if frame.codec != WEIGHTS_CODEC or frame.kind != "weights":
            raise UserError(f"the server sent {frame.kind} weights as {frame.codec}; this device reads {WEIGHTS_CODEC} only")
        return {t.name: torch.from_numpy(t.parts[0].copy()).view(t.shape) for t in frame.tensors}

    def upload(self, task_id: str, delta: dict[str, torch.Tensor], tokens: int, loss: float) -> str:
        records = [TensorRecord(n, "float32", tuple(t.shape), [t.numpy().reshape(-1)], ["float32"])
                   for n, t in delta.items()]
        body = encode_frame(Frame("update", UPLOAD_CODEC, {"tokens": tokens, "loss": loss}, records), UPLOAD_ZSTD)
        try:
            _, raw = self._call("POST", f"/v1/updates/{task_id}", body)
        except HttpError as e:
            if e.status in (409, 410):
                return "stale" if e.status == 409 else "lapsed"
            raise
        return msgpack.unpackb(raw, raw=False)["status"]

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> list[DeviceLog]:
        if self.data != "stdlib" and not Path(self.data).exists():
            raise UserError(f"data source not found: {self.data}")
        me = self.join()
        log.info(f"joined {self.server} as {me['client_id']} (device, tier {me['tier']}, {self.runtime}, "
                 f"{self.memory_bytes / 2**20:.0f} MiB declared)")
        try:
            self._loop(self._instruction_batches() if "lora" in me else self._text_batches())
        except KeyboardInterrupt:
            log.warning("interrupted: the open task's update is not sent (the server hands it out again after "
                        "its deadline)")
            raise
        finally:
            if self.log:
                outcomes = ", ".join(f"{sum(e.outcome == o for e in self.log)} {o}"
                                     for o in sorted({e.outcome for e in self.log}))
                log.info(f"done: {len(self.log)} tasks ({outcomes}), mean loss {self.log[-1].mean_loss:.3f} "
                         "in the last task")
        return self.log

    def _text_batches(self) -> Callable[[dict, Path, Manifest], Iterator]:
        corpus = load_corpus(self.data)
        shard = Shard(corpus, corpus.doc_bounds)
        return lambda task, folder, manifest: shard.batches(task["batch_size"], task["seq_len"], task["seed"])

    def _instruction_batches(self) -> Callable[[dict, Path, Manifest], Iterator]:
        """A LoRA federation's: instruction data (``stdlib``: the built-in set's training split,
        or a JSONL file), loss on the response only, in the tokens of the bundle's base."""
        examples = load_instructions(self.data)
        if self.data == "stdlib":
            examples = examples.split()[0]  # the held-out split is the server's to score on
        fits: set[int] = set()

        def batches(task: dict, folder: Path, manifest: Manifest) -> Iterator:
            encode, eos = bundle_encoding(folder, manifest)
            if task["seq_len"] not in fits:
                examples.check_fits(task["seq_len"], encode)
                fits.add(task["seq_len"])
            return examples.batches(task["batch_size"], task["seq_len"], task["seed"], encode, eos)

        return batches

    def _loop(self, batches: Callable[[dict, Path, Manifest], Iterator]) -> None:
        trainers: dict[str, object] = {}
        while self.max_tasks is None or len(self.log) < self.max_tasks:
            status, raw = self._call("GET", "/v1/task", params={"wait": LONG_POLL_S})
            if status == 204:
                continue
            task = msgpack.unpackb(raw, raw=False)["task"]
            plan = plan_hash(task["plan"])
            folder, downloads = self.bundle(plan)
            manifest = read_bundle(folder, plan_hash=plan, runtime=self.runtime)
            if plan not in trainers:
                trainers[plan] = _trainer(self.runtime, folder, manifest)
            trainer = trainers[plan]
            base = self.weights(task["base_version"], plan, manifest)
            trainer.load(base)
            train = dict(task["train"], betas=tuple(task["train"]["betas"]))
            result = train_loop(trainer, batches(task, folder, manifest), task["steps"], TrainConfig(**train),
                                task["step_offset"])
            trained = trainer.trained_weights()
            delta = {n: base[n] - w for n, w in trained.items()}
            outcome = self.upload(task["task_id"], delta, result.tokens, result.mean_loss)
            self.log.append(DeviceLog(task["task_id"], plan, result.steps, result.losses[0], result.losses[-1],
                                      result.mean_loss, outcome, downloads))
            log.info(f"task {task['task_id']}: v{task['base_version']} plan {plan} on {self.runtime}, "
                     f"{result.steps} steps, mean loss {result.mean_loss:.3f}"
                     + (", bundle downloaded" if downloads else "") + f": {outcome}")


def _why(e: BaseException) -> str:
    """A connection failure as a person says it: "connection refused"."""
    reason = getattr(e, "reason", e)
    if isinstance(reason, OSError) and reason.errno:
        return os.strerror(reason.errno).lower()
    return str(reason) or type(reason).__name__


def _trainer(runtime: str, folder: Path, manifest: Manifest):
    if runtime == "ort":
        from stamen.mobile_bridge.ort_trainer import OrtTrainer

        return OrtTrainer(folder, manifest)
    if runtime == "executorch":
        from stamen.mobile_bridge.executorch_trainer import ExecuTorchTrainer

        return ExecuTorchTrainer(folder, manifest)
    raise UserError(f"unknown device runtime {runtime!r}: use ort or executorch")


def run_device(server: str, token: str, runtime: str, data: str, cache_dir: str | Path,
               max_tasks: int | None = None, memory_bytes: int = 8 << 20) -> list[DeviceLog]:
    """``stamen device-emulator``: train for the server with a native runtime until stopped."""
    if runtime not in BUNDLE_RUNTIMES:
        raise UserError(f"unknown device runtime {runtime!r}: use one of {', '.join(BUNDLE_RUNTIMES)}")
    return ReferenceDevice(server, token, runtime, data, cache_dir, memory_bytes, max_tasks).run()
