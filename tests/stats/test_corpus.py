"""Corpora, fingerprints, budgeted windows and bucketed, sharded batches."""

from __future__ import annotations

import json
import shutil

import pytest

from kmec.errors import StatsError
from kmec.hashing import sha256_file
from kmec.stats.batches import bucket, pools
from kmec.stats.corpus import Window, default_corpus_path, resolve_corpus, special_prefix, windows
from tests.conftest import ByteTokenizer


class BosTokenizer(ByteTokenizer):
    """A ByteTokenizer that puts a BOS (id 127) before text by default."""

    def __call__(self, texts, add_special_tokens=True, **kw):
        out = super().__call__(texts, **kw)
        if add_special_tokens and isinstance(texts, str):
            out = {k: ([127] if k == "input_ids" else [1]) + list(v) for k, v in out.items()}
        return out


def test_default_corpus_ships_with_its_notice():
    c = resolve_corpus("default")
    path = default_corpus_path()
    assert c.files == (path,)
    notice = (path.parent / "PROVENANCE.md").read_text()
    assert "CC BY-SA 3.0" in notice and "GFDL" in notice and sha256_file(path) in notice
    assert path.stat().st_size < 4 * 2**20
    docs = list(c.documents())
    assert len(docs) == 62 and docs[0].startswith("Robert Boulter")
    assert resolve_corpus(None).fingerprint == c.fingerprint


def test_fingerprint_is_content_not_name(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("one\n\ntwo\n")
    b = tmp_path / "renamed.txt"
    shutil.copy(a, b)
    assert resolve_corpus(a).fingerprint == resolve_corpus(b).fingerprint
    b.write_text("one\n\ntwo!\n")
    assert resolve_corpus(a).fingerprint != resolve_corpus(b).fingerprint
    j = tmp_path / "a.jsonl"
    j.write_bytes(a.read_bytes())  # same bytes, another format: another corpus
    assert resolve_corpus(j).fingerprint != resolve_corpus(a).fingerprint


def test_text_jsonl_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("para one\nstill one\n\n\npara two\n")
    (tmp_path / "sub" / "a.jsonl").write_text(json.dumps({"text": "json doc"}) + "\n\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    c = resolve_corpus(tmp_path)
    assert [f.name for f in c.files] == ["b.txt", "a.jsonl"]
    assert list(c.documents()) == ["para one\nstill one", "para two", "json doc"]


def test_bad_corpora_raise_clear_errors(tmp_path):
    with pytest.raises(StatsError, match="does not exist"):
        resolve_corpus(tmp_path / "nope.txt")
    with pytest.raises(StatsError, match="no .txt"):
        resolve_corpus(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(StatsError, match=r"bad.jsonl:2"):
        list(resolve_corpus(bad).documents())


def test_long_paragraphs_are_cut(tmp_path):
    f = tmp_path / "long.txt"
    f.write_text(("x" * 1000 + "\n") * 200)
    docs = list(resolve_corpus(f).documents())
    assert len(docs) > 1 and all(len(d) <= 70_000 for d in docs)


def _corpus(tmp_path, docs):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(docs) + "\n")
    return resolve_corpus(f)


def test_windows_respect_budgets_exactly(tmp_path):
    c = _corpus(tmp_path, ["a" * 25, "b" * 7, "c" * 40])
    tok = ByteTokenizer()
    ws = list(windows(c, tok, max_len=10, tokens=1000))
    assert [len(w.ids) for w in ws] == [10, 10, 5, 7, 10, 10, 10, 10]
    assert [w.index for w in ws] == list(range(8))
    ws = list(windows(c, tok, max_len=10, tokens=33))
    assert sum(w.n_counted for w in ws) == 33 and len(ws[-1].ids) == 1
    ws = list(windows(c, tok, max_len=10, tokens=1000, samples=3))
    assert len(ws) == 3


def test_special_prefix_is_fed_but_not_counted(tmp_path):
    tok = BosTokenizer()
    assert special_prefix(tok) == (127,)
    assert special_prefix(ByteTokenizer()) == ()
    c = _corpus(tmp_path, ["a" * 20])
    ws = list(windows(c, tok, max_len=8, tokens=100))
    assert all(w.ids[0] == 127 and w.n_special == 1 for w in ws)
    assert sum(w.n_counted for w in ws) == 20
    with pytest.raises(StatsError):
        list(windows(c, tok, max_len=1, tokens=10))


def test_bucketing_masks_padding_and_specials():
    ws = [Window(0, (5, 1, 2), 1), Window(1, (5, 1, 2, 3, 4, 6), 1), Window(2, (5, 9), 1)]
    (b,) = bucket(ws, batch_tokens=100, pad_id=0)
    assert b.input_ids.tolist() == [[5, 1, 2, 3, 4, 6], [5, 1, 2, 0, 0, 0], [5, 9, 0, 0, 0, 0]]
    assert b.attention_mask.sum().item() == 11
    assert b.counted.sum().item() == b.tokens == 8
    assert not b.counted[:, 0].any()
    assert len(bucket(ws, batch_tokens=6, pad_id=0)) == 2  # one long row per batch, then the rest


def test_shards_partition_the_stream_and_resume_skips(tmp_path):
    c = _corpus(tmp_path, ["word " * 30, "x" * 13, "y" * 90, "z"])
    tok = ByteTokenizer()
    stream = list(windows(c, tok, max_len=16, tokens=10_000))

    def indices(rank, world, start=0, pool_size=3):
        got = []
        for pool in pools(iter(stream), batch_tokens=64, pool_size=pool_size, pad_id=0,
                          rank=rank, world=world, start=start):
            got.append(pool.position)
            for b in pool.batches:
                assert b.input_ids.shape[0] * b.input_ids.shape[1] <= 64
        return got

    total = sum(w.n_counted for w in stream)
    shard_tokens = 0
    for rank in range(3):
        for pool in pools(iter(stream), batch_tokens=64, pool_size=4, pad_id=0, rank=rank, world=3):
            shard_tokens += sum(b.tokens for b in pool.batches)
    assert shard_tokens == total
    positions = indices(0, 1)
    assert positions[-1] == len(stream)
    # Resuming at a pool boundary yields exactly the remaining pools.
    mid = positions[1]
    rest = list(pools(iter(stream), batch_tokens=64, pool_size=3, pad_id=0, start=mid))
    full = list(pools(iter(stream), batch_tokens=64, pool_size=3, pad_id=0))
    assert sum(b.tokens for p in rest for b in p.batches) == \
        sum(b.tokens for p in full[2:] for b in p.batches)
