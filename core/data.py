"""Text corpora as one byte array, client shards as byte ranges into it, and batch streams.

The tokenizer is bytes (vocab 256), so a corpus is a single ``uint8`` array: documents sit
end to end, each with the name of the group it came from (the top-level stdlib package, the
sub-folder of a text folder, ...). A client's shard is a list of ``(start, end)`` ranges into
that array, so a thousand clients cost a thousand small lists, never a thousand copies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stamen.core.errors import UserError
from stamen.core.names import check_source

log = logging.getLogger(__name__)
VOCAB_SIZE = 256
SEPARATOR = b"\n\n"
# Parts of the stdlib that are not its own source: vendored packages, test data, generated tables.
STDLIB_SKIP = {"site-packages", "test", "idlelib", "lib2to3", "__pycache__", "ensurepip"}


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode(tokens) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8)).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    """All documents, end to end. ``doc_bounds[i]`` is document i's ``(start, end)``."""

    data: np.ndarray  # uint8
    doc_bounds: np.ndarray  # int64 [n_docs, 2]
    doc_groups: list[str]
    doc_names: list[str]

    @classmethod
    def from_documents(cls, docs: list[tuple[str, str, bytes]]) -> "Corpus":
        """``docs`` holds (group, name, bytes); they are stored sorted by (group, name) so the
        layout is the same on every machine whatever order the file system lists them in."""
        docs = sorted(d for d in docs if d[2])
        if not docs:
            raise UserError("the data source holds no text")
        parts, bounds, pos = [], [], 0
        for _, _, raw in docs:
            parts += [raw, SEPARATOR]
            bounds.append((pos, pos + len(raw)))
            pos += len(raw) + len(SEPARATOR)
        data = np.frombuffer(b"".join(parts), dtype=np.uint8)
        return cls(data, np.array(bounds, dtype=np.int64), [d[0] for d in docs], [d[1] for d in docs])

    def split(self, val_fraction: float = 0.05) -> tuple["Shard", "Shard"]:
        """Hold out whole documents for validation, chosen by a hash of their name so the
        split is stable across runs, seeds and machines."""
        is_val = np.array([held_out(n, val_fraction) for n in self.doc_names])
        if is_val.all() or not is_val.any():  # tiny corpora: keep one document on each side
            is_val = np.zeros(len(self.doc_names), dtype=bool)
            is_val[-1] = len(is_val) > 1
        return Shard(self, self.doc_bounds[~is_val]), Shard(self, self.doc_bounds[is_val])

    def groups(self, shard: "Shard") -> dict[str, np.ndarray]:
        """The shard's ranges keyed by the group of the document they start in."""
        starts = self.doc_bounds[:, 0]
        doc_idx = np.searchsorted(starts, shard.ranges[:, 0], side="right") - 1
        out: dict[str, list] = {}
        for r, d in zip(shard.ranges, doc_idx):
            out.setdefault(self.doc_groups[d], []).append(r)
        return {g: np.array(rs, dtype=np.int64) for g, rs in out.items()}


@dataclass
class Shard:
    """Some byte ranges of a corpus: a client's data, or a validation split."""

    corpus: Corpus
    ranges: np.ndarray  # int64 [n, 2]

    @property
    def n_bytes(self) -> int:
        return int((self.ranges[:, 1] - self.ranges[:, 0]).sum()) if len(self.ranges) else 0

    def select(self, groups: set[str]) -> "Shard":
        """The ranges that start in a document of one of ``groups``."""
        starts = self.corpus.doc_bounds[:, 0]
        doc = np.searchsorted(starts, self.ranges[:, 0], side="right") - 1
        keep = np.array([self.corpus.doc_groups[d] in groups for d in doc], dtype=bool)
        return Shard(self.corpus, self.ranges[keep] if len(keep) else self.ranges)

    def histogram(self) -> np.ndarray:
        """Byte frequencies (a unigram model of the shard)."""
        counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
        for s, e in self.ranges:
            counts += np.bincount(self.corpus.data[s:e], minlength=VOCAB_SIZE)
        return counts

    def unigram_entropy(self) -> float:
        """Entropy of the shard's byte distribution in nats: the loss of the best model that
        ignores context, the bar a trained model must clear."""
        p = self.histogram() / max(self.n_bytes, 1)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    def batches(self, batch_size: int, seq_len: int, seed: int) -> "BatchStream":
        return BatchStream(self, batch_size, seq_len, seed)

    def fixed_batches(self, n_batches: int, batch_size: int, seq_len: int, seed: int = 0) -> list:
        """A fixed list of batches: the same validation set for every evaluation."""
        stream = self.batches(batch_size, seq_len, seed)
        return [next(stream) for _ in range(n_batches)]


class BatchStream(Iterator):
    """Endless (x, y) batches of random windows of seq_len+1 bytes, drawn from the shard's
    ranges in proportion to their length. Deterministic for a seed."""

    def __init__(self, shard: Shard, batch_size: int, seq_len: int, seed: int) -> None:
        lengths = shard.ranges[:, 1] - shard.ranges[:, 0] - seq_len - 1
        ok = lengths > 0
        if not ok.any():
            raise UserError(f"data shard has no document longer than seq_len+1 = {seq_len + 1} bytes")
        self.starts, self.spans = shard.ranges[ok, 0], lengths[ok]
        self.cum = np.cumsum(self.spans)
        self.total = int(self.cum[-1])  # a Python int: Generator.integers takes it faster than a numpy scalar
        self.data, self.batch_size, self.seq_len = shard.corpus.data, batch_size, seq_len
        self.rng = np.random.default_rng(seed)
        self.offsets = np.arange(seq_len + 1)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.data[self._next_starts()[:, None] + self.offsets].astype(np.int64)
        return torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])  # numpy slices cost less

    def _next_starts(self) -> np.ndarray:
        """Where the next batch's windows start in the corpus; advances the stream."""
        pos = self.rng.integers(0, self.total, size=self.batch_size)
        r = np.searchsorted(self.cum, pos, side="right")
        return self.starts[r] + pos - (self.cum[r] - self.spans[r])


def next_batches(streams: Sequence[Iterator[tuple[torch.Tensor, torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The next (x, y) batch of every stream, stacked along a leading axis [len(streams), B, T]:
    what stacking ``next(s)`` for each stream gives. ``BatchStream``s over one corpus with one
    shape are cut out of it in one gather, without a tensor per stream (a step of 100 batched
    devices spent 3 % of its time fetching batches one by one)."""
    first = streams[0]
    if all(isinstance(s, BatchStream) and s.data is first.data and s.offsets.shape == first.offsets.shape
           and s.batch_size == first.batch_size for s in streams):
        starts = np.stack([s._next_starts() for s in streams])
        window = torch.from_numpy(first.data[starts[..., None] + first.offsets].astype(np.int64))
        return window[..., :-1], window[..., 1:]
    xs, ys = zip(*(next(s) for s in streams))
    return torch.stack(xs), torch.stack(ys)


def _read_text(path: Path) -> bytes:
    return path.read_bytes().decode("utf-8", errors="replace").encode("utf-8")


def held_out(name: str, val_fraction: float = 0.05) -> bool:
    """Whether ``Corpus.split`` holds the document named ``name`` out for validation."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32 < val_fraction


@functools.cache
def stdlib_corpus(validation_only: bool = False) -> Corpus:
    """The Python standard library's own source: real text on every machine, with a natural
    non-IID grouping by top-level package or module. ``validation_only`` reads just the files
    ``split`` holds out (a server's held-out set without reading the other 95%). Read once per
    process and shared (its bytes are a read-only array): ``--compare`` and ``--sync-vs-async``
    run many simulations and centralized runs in one process, each of which read it anew."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if STDLIB_SKIP & set(rel.parts) or "tests" in rel.parts or rel.parts[0].startswith("config-"):
            continue
        if validation_only and not held_out(rel.as_posix()):
            continue
        docs.append((rel.parts[0].removesuffix(".py"), rel.as_posix(), _read_text(p)))
    return Corpus.from_documents(docs)


@dataclass
class Loaded:
    """What a text source held: the one line a user reads to know the data is what they meant."""

    source: str
    files: int = 0
    bytes: int = 0
    hidden: int = 0  # files under (or named) .something: .git, .cache, editor swap files
    binary: int = 0  # not UTF-8, or holding NUL bytes

    def line(self) -> str:
        skipped = [f"{n} {what}" for n, what in ((self.hidden, "hidden"), (self.binary, "binary or non-UTF-8"))
                   if n]
        return (f"data {self.source}: {self.files:,} text file{'s' * (self.files != 1)}, {self.bytes:,} bytes"
                + (f" (skipped {', '.join(skipped)})" if skipped else ""))


def text_bytes(raw: bytes) -> bytes | None:
    """``raw`` if it is UTF-8 text, else None. A NUL byte marks a binary file even when the
    bytes happen to decode (UTF-16 text, object files with long ASCII runs)."""
    if b"\0" in raw:
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return raw


def folder_corpus(path: str | Path) -> Corpus:
    """Every UTF-8 text file under a folder, or a single text file; the group is the file's
    first-level sub-folder. Hidden files and folders (``.git``, ...) and binary files are
    skipped and counted; the counts are logged in one line."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"data not found: {root}")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    seen, docs = Loaded(str(root)), []
    for p in files:
        rel = p.relative_to(root) if p != root else Path(p.name)
        if any(part.startswith(".") for part in rel.parts):
            seen.hidden += 1
            continue
        raw = text_bytes(p.read_bytes())
        if raw is None:
            seen.binary += 1
            continue
        seen.files += 1
        seen.bytes += len(raw)
        docs.append((rel.parts[0] if len(rel.parts) > 1 else "", rel.as_posix(), raw))
    if not seen.bytes:
        raise UserError(f"no text in {root}: {seen.line().split(': ', 1)[1]}")
    log.info(seen.line())
    return Corpus.from_documents(docs)


def jsonl_corpus(path: str | Path, text_field: str = "text", group_field: str | None = None) -> Corpus:
    """One document per JSON line, its text under ``text_field``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {p}")
    docs = []
    with p.open("rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{p}:{i}: not a JSON object with a {text_field!r} field") from None
            group = str(rec.get(group_field, "")) if group_field else ""
            docs.append((group, f"{p.name}:{i:09d}", str(text).encode("utf-8")))
    if not docs:
        raise UserError(f"data file holds no text: {p}")
    log.info(f"data {p}: {len(docs):,} documents, {sum(len(d[2]) for d in docs):,} bytes")
    return Corpus.from_documents(docs)


def load_corpus(source: str) -> Corpus:
    """``stdlib`` (the built-in corpus), a ``.jsonl`` file, a text file, or a folder of them."""
    check_source(source)
    if source == "stdlib":
        return stdlib_corpus()
    if source.endswith(".jsonl"):
        return jsonl_corpus(source)
    return folder_corpus(source)


def public_groups(corpus: Corpus, share: float, seed: int) -> set[str]:
    """Groups (top-level packages) holding about ``share`` of the corpus's bytes, drawn in a
    seeded order: the *public* text a simulation's GPU nodes read, the rest being the devices'
    private text. Whole groups, so public and private text never share a package (a GPU node
    has not seen a line of the code a phone holds), and validation splits the same way."""
    if not 0.0 < share < 1.0:
        raise UserError(f"public share must be in (0, 1), got {share}")
    sizes: dict[str, int] = {}
    for (s, e), g in zip(corpus.doc_bounds, corpus.doc_groups):
        sizes[g] = sizes.get(g, 0) + int(e - s)
    names = sorted(sizes)
    if len(names) < 2:
        raise UserError("a public/private split needs text in at least two groups (folders or packages)")
    np.random.default_rng(seed).shuffle(names)
    total, taken, out = sum(sizes.values()), 0, set()
    for g in names:
        if taken >= share * total or len(out) == len(names) - 1:
            break
        out.add(g)
        taken += sizes[g]
    return out


def _chunks(ranges: np.ndarray, size: int) -> np.ndarray:
    """Cut ranges into pieces of at most ``size`` bytes (the unit IID/Dirichlet deal out)."""
    out = []
    for s, e in ranges:
        cuts = np.arange(s, e, size)
        out.append(np.stack([cuts, np.minimum(cuts + size, e)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def window_bytes(seq_len: int) -> int:
    """The shortest range a batch can draw a training window from: ``BatchStream`` takes windows
    of seq_len+1 bytes (inputs and shifted targets) at one of ``length − seq_len − 1`` starts,
    so a range must be longer than seq_len+1."""
    return seq_len + 2


def _windows(ranges: np.ndarray, unit: int) -> np.ndarray:
    """How many whole ``unit``-byte windows each range holds."""
    return (ranges[:, 1] - ranges[:, 0]) // unit


def partition_natural(shard: Shard, n_clients: int, seed: int, seq_len: int) -> list[Shard]:
    """Split by group (top-level package): with fewer clients than groups each client gets
    whole groups (in a seeded order, each to the client holding the fewest bytes); with
    more clients, each group gets clients in proportion to its training windows (pieces of
    ``window_bytes(seq_len)`` bytes inside one document) and is cut into contiguous pieces at
    window boundaries, so every client's data still comes from one package and holds at least
    one whole window: 100,000 devices on 10 MB of text each get ~100 bytes they can train on,
    where cuts at arbitrary bytes left some only fragments shorter than a window."""
    groups = shard.corpus.groups(shard)
    names = sorted(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    if n_clients <= len(names):
        sizes = {g: int((groups[g][:, 1] - groups[g][:, 0]).sum()) for g in names}
        load, owned = np.zeros(n_clients), [[] for _ in range(n_clients)]
        for g in names:
            c = int(np.argmin(load))
            owned[c].append(groups[g])
            load[c] += sizes[g]
        return [Shard(shard.corpus, np.concatenate(o)) for o in owned]
    unit = window_bytes(seq_len)
    wins = {g: int(_windows(groups[g], unit).sum()) for g in names}
    total = sum(wins.values())
    if total < n_clients:
        raise UserError(f"the text holds {total:,} training windows of {unit} bytes, fewer than the "
                        f"{n_clients:,} devices to deal it to: use fewer devices or more text")
    groups, names, wins = _merge_small(groups, names, wins, max(1.0, total / n_clients / 2))
    out = []
    for g, count in _allocate(n_clients, names, wins).items():
        r = groups[g]
        cum = np.concatenate([[0], np.cumsum(r[:, 1] - r[:, 0])])
        wcum = np.concatenate([[0], np.cumsum(_windows(r, unit))])
        cuts = np.linspace(0, wins[g], count + 1).astype(np.int64)  # in windows: each piece gets >= 1
        i = np.searchsorted(wcum, cuts[:-1], side="right") - 1  # the range each cut's window lies in
        at = np.append(cum[i] + (cuts[:-1] - wcum[i]) * unit, cum[-1])
        at[0] = 0
        for a, b in zip(at[:-1], at[1:]):
            out.append(Shard(shard.corpus, _slice_ranges(r, cum, a, b)))
    return out


def _allocate(n_clients: int, names: list[str], wins: dict[str, int]) -> dict[str, int]:
    """Clients per group: at least one and at most one per window each, the rest in proportion
    to windows (largest remainder). Groups whose share would exceed their windows get exactly
    their windows, and the others share what is left."""
    fixed: dict[str, int] = {}
    while True:
        rest = [g for g in names if g not in fixed]
        left, total = n_clients - sum(fixed.values()), sum(wins[g] for g in rest)
        share = {g: 1 + (left - len(rest)) * wins[g] / total for g in rest}
        over = [g for g in rest if share[g] > wins[g]]
        if not over:
            break
        fixed.update({g: wins[g] for g in over})
    alloc = {g: int(share[g]) for g in rest}
    for g in sorted(rest, key=lambda g: alloc[g] - share[g])[: left - sum(alloc.values())]:
        alloc[g] += 1
    return {g: fixed.get(g, alloc.get(g)) for g in names}


def _merge_small(groups: dict, names: list, sizes: dict, floor: float):
    """Pool groups smaller than ``floor`` windows (in the seeded order) until each pool
    reaches it, so no client of a fine partition is left with a few hundred bytes and every
    group left holds a window."""
    out_groups, out_names, out_sizes, pool, pool_size = {}, [], {}, [], 0
    for g in names:
        if sizes[g] >= floor:
            out_groups[g], out_sizes[g] = groups[g], sizes[g]
            out_names.append(g)
            continue
        pool.append(g)
        pool_size += sizes[g]
        if pool_size >= floor:
            key = "+".join(pool)
            out_groups[key] = np.concatenate([groups[p] for p in pool])
            out_sizes[key], pool, pool_size = pool_size, [], 0
            out_names.append(key)
    if pool:  # a leftover pool, smaller than the floor, joins the last group made
        last = out_names.pop() if out_names else None
        key = "+".join(([last] if last else []) + pool)
        parts = ([out_groups.pop(last)] if last else []) + [groups[p] for p in pool]
        out_groups[key] = np.concatenate(parts)
        out_sizes[key] = pool_size + (out_sizes.pop(last) if last else 0)
        out_names.append(key)
    return out_groups, out_names, out_sizes


def _slice_ranges(r: np.ndarray, cum: np.ndarray, a: int, b: int) -> np.ndarray:
    """The part of ranges ``r`` between byte ``a`` and ``b`` of their concatenation."""
    i, j = np.searchsorted(cum, a, side="right") - 1, np.searchsorted(cum, b, side="left")
    sel = r[i:j].copy()
    sel[0, 0] += a - cum[i]
    sel[-1, 1] -= cum[j] - b
    return sel[sel[:, 1] > sel[:, 0]]


def partition_iid(shard: Shard, n_clients: int, seed: int, chunk: int = 4096) -> list[Shard]:
    """Chunks of ``chunk`` bytes shuffled and dealt round-robin."""
    pieces = _chunks(shard.ranges, chunk)
    order = np.random.default_rng(seed).permutation(len(pieces))
    if len(pieces) < n_clients:
        raise UserError(f"corpus too small for {n_clients} clients")
    return [Shard(shard.corpus, pieces[np.sort(order[c::n_clients])]) for c in range(n_clients)]


def partition_dirichlet(shard: Shard, n_clients: int, seed: int, alpha: float = 0.5,
                        chunk: int = 4096) -> list[Shard]:
    """Each group's chunks go to clients in proportions drawn from Dirichlet(alpha): small
    alpha gives each client few groups (very non-IID), large alpha approaches IID."""
    rng = np.random.default_rng(seed)
    groups = shard.corpus.groups(shard)
    owned: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for g in sorted(groups):
        pieces = _chunks(groups[g], chunk)
        p = rng.dirichlet(np.full(n_clients, alpha))
        owner = rng.choice(n_clients, size=len(pieces), p=p)
        for c in range(n_clients):
            if (owner == c).any():
                owned[c].append(pieces[owner == c])
    empty = [c for c in range(n_clients) if not owned[c]]
    if empty:  # give each empty client a chunk from the largest one
        for c in empty:
            donor = max(range(n_clients), key=lambda k: sum(len(x) for x in owned[k]))
            biggest = max(range(len(owned[donor])), key=lambda i: len(owned[donor][i]))
            arr = owned[donor][biggest]
            if len(arr) < 2:
                raise UserError(f"corpus too small for {n_clients} clients")
            owned[c].append(arr[-1:])
            owned[donor][biggest] = arr[:-1]
    return [Shard(shard.corpus, np.concatenate(o)) for o in owned]


PARTITIONS = {"natural": partition_natural, "iid": partition_iid, "dirichlet": partition_dirichlet}


def partition(shard: Shard, n_clients: int, how: str, seed: int, *, seq_len: int) -> list[Shard]:
    """``shard`` dealt to ``n_clients`` by ``how``. Every client gets text it can train on (a
    range longer than seq_len+1 bytes): a source that cannot give each one that is refused here,
    at start-up, not by a batch stream mid-run."""
    if how not in PARTITIONS:
        raise UserError(f"unknown partition {how!r}: use one of {', '.join(PARTITIONS)}")
    if n_clients < 1:
        raise UserError(f"number of clients must be at least 1, got {n_clients}")
    parts = (partition_natural(shard, n_clients, seed, seq_len) if how == "natural"
             else PARTITIONS[how](shard, n_clients, seed))
    unit = window_bytes(seq_len)
    bare = sum(not (_windows(p.ranges, unit) > 0).any() for p in parts)
    if bare:
        raise UserError(f"the {how} partition leaves {bare:,} of {n_clients:,} clients no text longer than "
                        f"seq_len+1 = {seq_len + 1} bytes: use fewer clients, more text or partition = \"natural\"")
    return parts


def cached_corpus(source: str, folder: Path) -> Corpus:
    """``load_corpus(source)``, kept in ``folder`` for processes that would otherwise read and
    encode the same text again (a Flower SuperNode runs every task in a new process). The copy
    is keyed by the source, every file's size and modification time (the standard library's:
    the Python build) and this loader's code, so an edited, added or removed file, another
    Python, or a new stamen reads the text anew."""
    root = Path(sysconfig.get_paths()["stdlib"]) if source == "stdlib" else Path(source)
    if not root.exists():
        return load_corpus(source)  # its error
    key = hashlib.sha256(Path(__file__).read_bytes())
    key.update(f"{root.resolve()}\0{sys.version}\n".encode())
    files = [] if source == "stdlib" else sorted(root.rglob("*")) if root.is_dir() else [root]
    for f in files:
        st = f.stat()
        key.update(f"{f.relative_to(root) if f != root else ''}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    path = Path(folder) / f"corpus-{key.hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return Corpus(z["data"], z["doc_bounds"], z["doc_groups"].tolist(), z["doc_names"].tolist())
    corpus = load_corpus(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob("corpus-*.npz"):
        old.unlink()
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        np.savez(f, data=corpus.data, doc_bounds=corpus.doc_bounds, doc_groups=np.array(corpus.doc_groups),
                 doc_names=np.array(corpus.doc_names))
    tmp.replace(path)
    return corpus
