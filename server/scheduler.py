"""Who trains what: a plan, a step count and an inner optimizer for each client, from what it
declared. Pure logic with the clock passed in (``now``), so the HTTP server and the simulator's
virtual clock drive the very same object.

Three rules from the field. GPU nodes train the full model for many inner steps with AdamW
whose state they keep (DiLoCo, Photon); devices train the largest tier plan their memory
holds, no larger than their hardware class's tier, for as many steps as fit their compute in
the task's deadline. One global step counter places every task on the federation's single lr
schedule (Photon's server step counter). It runs on the GPU nodes' work when there are any: a
round of M nodes that each train s steps is s steps (DiLoCo), so every accepted node update
adds its steps / M, and device updates, and the versions they alone publish, add nothing. A
federation with devices then follows the same schedule in time as its nodes alone: when the
counter advanced by the most steps merged per version, the devices' extra versions ran the
cosine down about twice as fast as the nodes alone did (issue 11's comparisons were unfair by
that). Without GPU nodes it advances by the most steps any merged update trained.
Tasks not uploaded by their deadline lapse, and the work goes to the next client that asks.

Two policies (``[aggregation] mode``). ``async`` (FedBuff): any client that asks gets a task at
the current version, up to the cap on device tasks in flight. ``rounds`` (synchronous
FedAvg/DiLoCo): a version's round holds every GPU node once and ``buffer_k`` minus the nodes
device tasks, over-selected by ``overselect`` (Bonawitz et al., "Towards Federated Learning at
Scale", 2019: 130 %); a client asking when its role's share of the round is out gets nothing
until the next version (or until one of the round's tasks lapses, which frees its place). With
``tau_max = 0`` the aggregator then merges exactly one round per version and refuses the late.

Under ``async`` with versions paced by some tiers (``paced_by``, the GPU nodes), a paced client
whose update sits in the open buffer gets no task while another paced client still trains at
this version: it gets one once that update publishes the version. Otherwise the first node back
trains from the version its own update is about to replace, and every other update of a pair
of nodes arrives one version stale (session 12 measured half of them; the nodes alone were
1.5-1.9% worse than synchronous rounds at equal time and tokens). With the wait, K paced
nodes alone publish exactly DiLoCo's rounds (a test shows it bit for bit), and devices keep
training meanwhile. A paced client with no peer training (the others lapsed or left) is never
held: nothing else would publish.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import astuple, dataclass

from stamen.core.errors import UserError
from stamen.core.model import GPTConfig
from stamen.core.plan import Plan, PlanCost
from stamen.core.records import Capabilities, Task
from stamen.core.wire import RUNTIMES
from stamen.server.config import FederationConfig


@dataclass(frozen=True)
class Assignment:
    """A client's standing: the tier (and so plan and settings) the scheduler gave it."""

    client_id: str
    tier: str
    plan: Plan  # the tier's first plan; a rotating tier's tasks each name their own window
    caps: Capabilities


class Scheduler:
    def __init__(self, cfg: GPTConfig, fed: FederationConfig, seed: int = 0,
                 global_step: int = 0, next_seq: int = 0) -> None:
        self.cfg, self.fed, self.seed = cfg, fed, seed
        self.plans = fed.plans(cfg)  # tier → its plans (several for a rotating tier)
        self.global_step = global_step
        self.next_seq = next_seq
        self.clients: dict[str, Assignment] = {}
        self.in_flight: dict[str, Task] = {}  # task id → task; changed only through _open/_close
        # Indexes over in_flight, so a poll costs the same with 1,500 tasks out as with 15
        # (100,000 simulated devices poll millions of times): the task each client holds, the
        # tasks of registered devices (a task restored at start-up counts once its client
        # registers again), and the deadlines in a heap (entries of closed tasks are skipped).
        self._held: dict[str, str] = {}
        self._device_tasks: set[str] = set()
        self._refused_at = -math.inf  # when a device was last refused for the cap on tasks in flight
        self._served: dict[str, float] = {}  # device → when its last update was accepted (recent ones)
        self._served_cap = 64  # prune ``_served`` when it grows past this
        self._deadlines: list[tuple[float, str]] = []
        # Plans and settings never change, so neither do the tiers' costs (a join asked for
        # them a dozen times: registering 100,000 simulated devices took minutes). A rotating
        # tier costs its dearest window in each respect: a device must fit every one of them.
        self._costs = {tier: PlanCost(*map(max, zip(*(astuple(p.cost(cfg, fed.tiers[tier].batch_size,
                                                                      fed.training.seq_len)) for p in plans))))
                       for tier, plans in self.plans.items()}
        self._steps_since_publish = 0
        self._nodes = 0  # registered GPU nodes
        self._node_steps = 0  # steps of the GPU nodes' updates accepted since the last publish
        self._step_carry = 0.0  # the counter's fraction of a step (a restart may drop it: < 1 step)
        self._round_done: list[str] = []  # clients whose update was accepted since the last publish
        self._pacers: set[str] = set()  # registered clients of a ``paced_by`` tier

    def _cost(self, tier: str):
        return self._costs[tier]

    def _size(self, tier: str) -> tuple[int, int]:
        c = self._cost(tier)
        return c.trainable_params, c.params

    def tier_for(self, caps: Capabilities) -> str:
        """gpu role → the gpu tier. A device → the largest device tier (most trainable
        parameters) allowed by three caps: its hardware class (a phone-low never gets more
        than the phone-low tier, even when a tiny model fits its memory many times over), its
        declared memory, and its compute (the tier's full steps fit ``compute_share`` of the
        deadline; when no allowed tier does, the smallest, whose steps ``steps_for`` then cuts).
        A class that names no device tier ("" = unknown, or "gpu") caps nothing."""
        if caps.role == "gpu":
            return "gpu"
        devices = sorted((t for t in self.plans if t != "gpu"), key=self._size)  # stable: ties keep table order
        if not isinstance(caps.device_class, str):
            raise UserError(f"device_class must be a string, got {caps.device_class!r}")
        if caps.device_class in devices:  # tiers of equal size (window plans) above the class's are not "more"
            devices = devices[:devices.index(caps.device_class) + 1]
        fitting = [t for t in devices if self._cost(t).memory_bytes <= caps.memory_bytes]
        if not fitting:
            need = min(self._cost(t).memory_bytes for t in devices)
            raise UserError(f"no device tier fits {caps.memory_bytes / 2**20:.1f} MiB "
                            f"(the smallest needs {need / 2**20:.1f} MiB)")
        in_time = [t for t in fitting if self.steps_for(t, caps) >= self.fed.tiers[t].steps]
        return in_time[-1] if in_time else fitting[0]

    def admit(self, caps: Capabilities) -> str:
        """The tier a client with these capabilities gets, or UserError saying why none: the
        whole judgement of ``register``, without registering (a join is judged before any
        record of it is written)."""
        if caps.role not in ("device", "gpu"):
            raise UserError(f"unknown role {caps.role!r}: use device or gpu")
        if not any(r in RUNTIMES for r in caps.runtimes):
            raise UserError(f"no supported runtime among {list(caps.runtimes)}: use one of {', '.join(RUNTIMES)}")
        tier = self.tier_for(caps)
        runs_on = self.plans[tier][0].runtimes
        if not any(r in runs_on for r in caps.runtimes):
            raise UserError(f"tier {tier}'s plan runs on {', '.join(runs_on)}, not on {', '.join(caps.runtimes)}")
        return tier

    def register(self, client_id: str, caps: Capabilities) -> Assignment:
        tier = self.admit(caps)
        a = Assignment(client_id, tier, self.plans[tier][0], caps)
        old = self.clients.get(client_id)
        self._nodes += (caps.role == "gpu") - (old is not None and old.caps.role == "gpu")
        self.clients[client_id] = a
        if tier in self.fed.aggregation.paced_by:
            self._pacers.add(client_id)
        else:
            self._pacers.discard(client_id)
        if client_id in self._held:
            self._count(self._held[client_id])
        return a

    def steps_for(self, tier: str, caps: Capabilities) -> int:
        """The tier's steps, cut so the estimated compute fits ``compute_share`` of the deadline."""
        t, c = self.fed.tiers[tier], self._cost(tier)
        step_flops = c.flops_per_token * t.batch_size * self.fed.training.seq_len
        budget = self.fed.scheduler.compute_share * self.fed.scheduler.task_deadline_s * caps.flops
        return max(1, int(min(t.steps, budget / step_flops)))  # min first: budget may be huge

    def held(self, client_id: str) -> Task | None:
        """The task the client holds now, if any."""
        task_id = self._held.get(client_id)
        return None if task_id is None else self.in_flight[task_id]

    def next_task(self, client_id: str, version: int, now: float) -> Task | None:
        """The client's task: the one it already holds (a re-poll is idempotent), a new one,
        or None for a device when the cap on device tasks in flight is reached. The cap bounds
        staleness (about in-flight / buffer_k versions, FedBuff); GPU nodes are not counted, so
        a thousand devices queueing for slots never starve the few nodes that train the full
        model (and the embeddings, which device tiers freeze)."""
        a = self.clients.get(client_id)
        if a is None:
            raise KeyError(client_id)
        self.expire(now)
        held = self.held(client_id)
        if held is not None:
            return held
        if self.fed.aggregation.mode == "rounds" and self._round_full(a, version):
            return None
        if self._awaits_flush(a, version):
            return None
        if a.caps.role == "device":
            if len(self._device_tasks) >= self._device_cap():
                self._refused_at = now
                return None
            if self._yields(client_id, now):
                return None
        tier = self.fed.tiers[a.tier]
        seq = self.next_seq
        self.next_seq += 1
        plan = self._plan(a.tier, version)
        task = Task(
            task_id=f"t{seq:09d}", client_id=client_id, base_version=version, plan=plan,
            runtime=next(r for r in a.caps.runtimes if r in plan.runtimes), steps=self.steps_for(a.tier, a.caps),
            batch_size=tier.batch_size, seq_len=self.fed.training.seq_len,
            train=self.fed.train_config(a.tier, alone=not self._nodes), step_offset=self.global_step, codec=tier.codec,
            deadline=now + self.fed.scheduler.task_deadline_s, seed=self.seed * 1_000_003 + seq)
        self._open(task)
        return task

    def _yields(self, client_id: str, now: float) -> bool:
        """Whether a device gives a free place to the devices waiting for one: it had an update
        accepted within the last long poll, and since then another device was refused for the
        cap. FedBuff draws its concurrent clients from all who are available; first come, first
        served let the devices that took the places first keep them, since a device back with
        its update asks again at once (``POST /v1/updates?next=1``) while the refused wait in a
        long poll: in the simulator's default 120 virtual s, 28 of the 1,000 devices did all the
        devices' work, so their text was the only private text the model saw
        (docs/FINDINGS.md, session 14). Yielding, it long-polls like the others."""
        window = self.fed.server.long_poll_s
        return now - self._refused_at < window and now - self._served.get(client_id, -math.inf) < window

    def _device_cap(self) -> int:
        """Device tasks out at once: ``max_in_flight``, or ``max_in_flight_alone`` while no GPU
        node is registered. Beside the nodes, versions come at the nodes' pace and the devices'
        updates join them; alone, every K device updates publish a version, so a task's
        staleness is about the tasks in flight over K. The simulator's 30 in flight with K = 2
        left devices alone training on weights about 15 versions old, 18% of their updates
        refused as stale (README, "Devices alone")."""
        s = self.fed.scheduler
        return s.max_in_flight if self._nodes or not s.max_in_flight_alone else s.max_in_flight_alone

    def _plan(self, tier: str, version: int) -> Plan:
        """The plan of a task issued at ``version``. A rotating tier's window rolls by version
        (FedRolex: every task of one version takes the same window) while no GPU node is
        registered; with one, its tasks take the top window. The nodes train the whole model,
        and device updates below the top window made it worse than the top window alone
        (README, "Rotating windows"); without them nobody else trains the lower blocks and the
        embeddings."""
        plans = self.plans[tier]
        return plans[-1] if self._nodes else plans[(self.seed + version) % len(plans)]

    def _open(self, task: Task) -> None:
        self.in_flight[task.task_id] = task
        self._held.setdefault(task.client_id, task.task_id)
        self._count(task.task_id)
        heapq.heappush(self._deadlines, (task.deadline, task.task_id))

    def _count(self, task_id: str) -> None:
        """Count the task against the cap on device tasks when its client is a registered device."""
        a = self.clients.get(self.in_flight[task_id].client_id)
        if a is not None and a.caps.role == "device":
            self._device_tasks.add(task_id)
        else:
            self._device_tasks.discard(task_id)

    def _close(self, task_id: str) -> Task | None:
        task = self.in_flight.pop(task_id, None)
        if task is not None:
            if self._held.get(task.client_id) == task_id:
                del self._held[task.client_id]
            self._device_tasks.discard(task_id)
        return task

    def _round_full(self, a: Assignment, version: int) -> bool:
        """Whether this version's round has no place left for ``a``: a GPU node trains once a
        round; devices fill ``ceil(overselect × (buffer_k − GPU nodes))`` places, counting the
        round's tasks out and its updates already accepted."""
        if a.caps.role != "device":
            return a.client_id in self._round_done
        out = sum(t.base_version == version and self.clients[t.client_id].caps.role == "device"
                  for t in self.in_flight.values())
        done = sum(self.clients[c].caps.role == "device" for c in self._round_done)
        nodes = sum(c.caps.role != "device" for c in self.clients.values())
        places = math.ceil(self.fed.scheduler.overselect * (self.fed.aggregation.buffer_k - nodes))
        return out + done >= places

    @property
    def pacing(self) -> bool:
        """Whether a client of a ``paced_by`` tier is registered: only then are versions paced by
        those tiers (``Aggregator.pace``), and only then does one of them wait for a flush."""
        return bool(self._pacers)

    def _awaits_flush(self, a: Assignment, version: int) -> bool:
        """Whether ``a`` is a paced client whose update is in the open buffer while another
        paced client trains at ``version`` (whose update will publish it): see the module's
        docstring. Paced clients are few (the nodes), so this costs nothing per device poll."""
        if a.client_id not in self._pacers or a.client_id not in self._round_done:
            return False
        return any(c != a.client_id and (t := self.held(c)) is not None and t.base_version == version
                   for c in self._pacers)

    def round_deadline(self, version: int) -> float | None:
        """When the earliest of this version's tasks lapses (a place in a full round may free
        then); None when none is out."""
        return min((t.deadline for t in self.in_flight.values() if t.base_version == version), default=None)

    def restore_task(self, task: Task) -> None:
        """Put back a task issued before a restart (from the durable ledger). A client can come
        back holding two (its older one lapsed, or was abandoned, unjournaled): it works on the
        newer, so that is the one a re-poll returns; the older stays out until its deadline."""
        held = self._held.get(task.client_id)
        self._open(task)
        if held is not None and task.task_id > held:  # ids are zero-padded sequence numbers
            self._held[task.client_id] = task.task_id
        self.next_seq = max(self.next_seq, int(task.task_id[1:]) + 1)

    def expire(self, now: float) -> list[Task]:
        """Drop tasks past their deadline; their work is reissued to whoever asks next."""
        lapsed = []
        while self._deadlines and self._deadlines[0][0] < now:
            _, task_id = heapq.heappop(self._deadlines)
            task = self._close(task_id)
            if task is not None:
                lapsed.append(task)
        return lapsed

    def abandon(self, task_id: str) -> Task | None:
        """Close a task whose update can never be merged (refused as stale) or that its client
        gave back (it stopped), so the client's next poll gets fresh work from the current
        version instead of the same task back until its deadline. Its steps do not count
        toward the global step counter."""
        return self._close(task_id)

    def complete(self, task_id: str, now: float | None = None) -> Task:
        """An accepted update (at ``now``, when known) closes its task; its steps count toward
        the next publish."""
        task = self._close(task_id)
        if task is None:
            raise KeyError(task_id)
        self._steps_since_publish = max(self._steps_since_publish, task.steps)
        a = self.clients.get(task.client_id)
        if a is not None and a.caps.role == "gpu":
            self._node_steps += task.steps
        elif a is not None and now is not None:
            self._served[task.client_id] = now
            if len(self._served) > self._served_cap:  # keep only the recent, pruning as it doubles
                window = self.fed.server.long_poll_s
                self._served = {c: t for c, t in self._served.items() if now - t < window}
                self._served_cap = max(64, 2 * len(self._served))
        self._round_done.append(task.client_id)
        return task

    def published(self) -> int:
        """A version was published: advance the global step counter and return it (by the
        nodes' steps over the number of nodes, or without nodes by the most steps merged)."""
        if self._nodes:
            self._step_carry += self._node_steps / self._nodes
            whole = int(self._step_carry)
            self.global_step += whole
            self._step_carry -= whole
        else:
            self.global_step += self._steps_since_publish
        self._steps_since_publish = self._node_steps = 0
        self._round_done.clear()
        return self.global_step
