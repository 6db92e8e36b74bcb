import json

import numpy as np
import pytest
import torch

from stamen.core.data import (Shard, decode, encode, folder_corpus, jsonl_corpus, load_corpus, next_batches, partition,
                              public_groups)
from stamen.core.errors import UserError


def tv_distances(shards: list[Shard]) -> float:
    """Mean total-variation distance between each shard's byte histogram and the pooled one."""
    hists = np.stack([s.histogram() / s.n_bytes for s in shards])
    pooled = hists.mean(axis=0)
    return float(0.5 * np.abs(hists - pooled).sum(axis=1).mean())


def test_tokenizer_round_trip():
    text = "def f(x):\n    return 'é' * x\n"
    assert decode(encode(text)) == text and encode(text).max() < 256


def test_split_holds_out_whole_files_and_is_stable(stdlib):
    corpus, train, val = stdlib
    assert train.n_bytes > 10 * val.n_bytes > 0
    t2, v2 = corpus.split()
    assert np.array_equal(val.ranges, v2.ranges)
    assert not set(map(tuple, train.ranges)) & set(map(tuple, val.ranges))


@pytest.mark.parametrize("n", [8, 64, 1000])
def test_natural_partition_deterministic_and_nonempty(stdlib, n):
    _, train, _ = stdlib
    a, b = partition(train, n, "natural", seed=3, seq_len=64), partition(train, n, "natural", seed=3, seq_len=64)
    assert len(a) == n
    assert all(np.array_equal(x.ranges, y.ranges) for x, y in zip(a, b))
    assert min(s.n_bytes for s in a) > 1000
    assert sum(s.n_bytes for s in a) == train.n_bytes  # every byte goes to exactly one client
    c = partition(train, n, "natural", seed=4, seq_len=64)
    assert any(not np.array_equal(x.ranges, y.ranges) for x, y in zip(a, c))


def test_natural_partition_feeds_100k_devices_a_window_each(stdlib):
    """Cut at window boundaries, 10 MB of text feeds 100,000 devices: each holds a range a
    batch can draw from (at byte cuts some held only fragments and failed mid-run)."""
    _, train, _ = stdlib
    parts = partition(train, 100_000, "natural", seed=0, seq_len=64)
    assert len(parts) == 100_000
    assert all(((p.ranges[:, 1] - p.ranges[:, 0]) > 65).any() for p in parts)
    assert sum(p.n_bytes for p in parts) == train.n_bytes  # every byte still goes to exactly one client
    x, y = next(parts[-1].batches(4, 64, seed=0))
    assert x.shape == (4, 64) and (x[:, 1:] == y[:, :-1]).all()


def test_a_partition_that_cannot_feed_every_client_is_refused_up_front(stdlib):
    _, train, _ = stdlib
    with pytest.raises(UserError, match="training windows of 66 bytes, fewer than the 200,000 devices"):
        partition(train, 200_000, "natural", seed=0, seq_len=64)
    with pytest.raises(UserError, match="no text longer than seq_len\\+1 = 4097 bytes"):
        partition(train, 1000, "iid", seed=0, seq_len=4096)  # iid deals 4 KiB chunks: none holds a window


def test_natural_partition_is_visibly_non_iid(stdlib):
    _, train, _ = stdlib
    natural = tv_distances(partition(train, 16, "natural", seed=0, seq_len=64))
    iid = tv_distances(partition(train, 16, "iid", seed=0, seq_len=64))
    dirichlet = tv_distances(partition(train, 16, "dirichlet", seed=0, seq_len=64))
    assert natural > 4 * iid
    assert dirichlet > 2 * iid


def test_batches_are_windows_of_the_corpus(stdlib):
    corpus, train, _ = stdlib
    shard = partition(train, 8, "natural", seed=0, seq_len=64)[0]
    x, y = next(shard.batches(4, 32, seed=1))
    assert x.shape == y.shape == (4, 32) and (x[:, 1:] == y[:, :-1]).all()
    x2, _ = next(shard.batches(4, 32, seed=1))
    assert (x == x2).all()
    raw = bytes(corpus.data)
    for row in x.tolist():
        assert bytes(row) in raw


def test_next_batches_stacks_what_each_stream_gives(stdlib):
    """One gather over the corpus for many streams equals each stream's own next batch, step
    after step; a stream of another kind falls back to stacking them one by one."""
    _, train, _ = stdlib
    shards = partition(train, 8, "natural", seed=0, seq_len=32)
    together = [s.batches(4, 32, seed=d) for d, s in enumerate(shards)]
    alone = [s.batches(4, 32, seed=d) for d, s in enumerate(shards)]
    for _ in range(3):
        x, y = next_batches(together)
        xs, ys = zip(*(next(s) for s in alone))
        assert torch.equal(x, torch.stack(xs)) and torch.equal(y, torch.stack(ys)) and x.shape == (8, 4, 32)
    mixed = [shards[0].batches(4, 32, seed=0), iter([next(shards[1].batches(4, 32, seed=1))])]
    x, y = next_batches(mixed)
    assert torch.equal(x[0], next(shards[0].batches(4, 32, seed=0))[0])
    assert torch.equal(y[1], next(shards[1].batches(4, 32, seed=1))[1])


def test_folder_and_jsonl_sources(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("hello world " * 20)
    (tmp_path / "b.txt").write_text("second file " * 20)
    corpus = folder_corpus(tmp_path)
    assert corpus.doc_groups == ["", "a"] and corpus.doc_names == ["b.txt", "a/one.txt"]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"line {i} " * 10}) for i in range(5)))
    assert len(load_corpus(str(f)).doc_names) == 5


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "missing")):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no text"):
        folder_corpus(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        jsonl_corpus(bad)
    with pytest.raises(UserError, match="unknown partition"):
        partition(bad_source_shard(tmp_path), 2, "zipf", 0, seq_len=64)


def bad_source_shard(tmp_path) -> Shard:
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "t.txt").write_text("text " * 100)
    return folder_corpus(tmp_path / "ok").split()[0]


def test_cached_corpus_equals_the_loaded_one_and_rereads_an_edited_folder(tmp_path, monkeypatch):
    import stamen.core.data as data

    texts = tmp_path / "texts"
    (texts / "a").mkdir(parents=True)
    (texts / "a" / "one.txt").write_text("first document, long enough to train on\n" * 3)
    (texts / "two.txt").write_text("second document\n")
    cache = tmp_path / "cache"

    def same(x, y):
        return (np.array_equal(x.data, y.data) and np.array_equal(x.doc_bounds, y.doc_bounds)
                and x.doc_groups == y.doc_groups and x.doc_names == y.doc_names)

    assert same(data.cached_corpus(str(texts), cache), load_corpus(str(texts)))
    real = data.load_corpus
    with monkeypatch.context() as m:  # the second process reads the cached copy, not the text
        m.setattr(data, "load_corpus", lambda source: pytest.fail("read the text again"))
        assert same(data.cached_corpus(str(texts), cache), real(str(texts)))
    (texts / "two.txt").write_text("second document, edited\n")
    assert same(data.cached_corpus(str(texts), cache), load_corpus(str(texts)))
    assert len(list(cache.glob("corpus-*.npz"))) == 1  # the stale copy is gone


def test_public_groups_split_whole_packages_by_share(stdlib):
    corpus, train, val = stdlib
    public = public_groups(corpus, 0.5, seed=0)
    assert public == public_groups(corpus, 0.5, seed=0) != public_groups(corpus, 0.5, seed=1)
    private = set(corpus.doc_groups) - public
    pub, priv = train.select(public), train.select(private)
    assert pub.n_bytes + priv.n_bytes == train.n_bytes  # every training byte is on exactly one side
    assert set(corpus.groups(pub)) <= public and set(corpus.groups(priv)) <= private
    assert 0.3 < pub.n_bytes / train.n_bytes < 0.7
    assert val.select(public).n_bytes > 0 and val.select(private).n_bytes > 0
    with pytest.raises(UserError, match="public share"):
        public_groups(corpus, 1.0, seed=0)


def test_binary_and_hidden_files_are_skipped_and_counted(tmp_path, caplog):
    """A folder of ELF binaries, random bytes and a .git folder beside two text files: only
    the text is loaded, and one log line says what was skipped."""
    import logging
    import sys

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("print('héllo')\n" * 20)
    (tmp_path / "notes.txt").write_text("plain notes\n" * 20)
    (tmp_path / "python-binary").write_bytes(open(sys.executable, "rb").read(65536))  # an ELF file
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "utf16.txt").write_text("text in UTF-16\n", encoding="utf-16")
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / ".git" / "objects" / "pack").write_text("x" * 100)
    (tmp_path / ".swp").write_text("swap\n")
    with caplog.at_level(logging.INFO, logger="stamen.core.data"):
        corpus = folder_corpus(tmp_path)
    assert corpus.doc_names == ["notes.txt", "src/a.py"]
    text_bytes = len("print('héllo')\n".encode() * 20) + len("plain notes\n" * 20)
    assert [r.getMessage() for r in caplog.records] == [
        f"data {tmp_path}: 2 text files, {text_bytes:,} bytes (skipped 3 hidden, 3 binary or non-UTF-8)"]


def test_a_single_text_file_is_a_data_source(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("call me Ishmael. " * 50)
    corpus = load_corpus(str(f))
    assert corpus.doc_names == ["book.txt"] and bytes(corpus.data[:17]) == b"call me Ishmael. "
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    with pytest.raises(UserError, match="no text in .*image.png: 0 text files, 0 bytes \\(skipped 1 binary"):
        load_corpus(str(tmp_path / "image.png"))


def test_the_stdlib_validation_files_alone_are_the_split(stdlib):
    """A server reads only the held-out files: the same documents, byte for byte, as split()."""
    from stamen.core.data import stdlib_corpus

    corpus, _, val = stdlib
    alone = stdlib_corpus(validation_only=True)
    assert bytes(alone.data) == b"".join(bytes(corpus.data[s:e]) + b"\n\n" for s, e in val.ranges)
