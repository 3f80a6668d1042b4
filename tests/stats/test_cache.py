"""The content-addressed moments cache: keys, reuse by token count, atomicity, checkpoints."""

from __future__ import annotations

import logging

import torch

from kmec.stats import SecondMoment, StatsCache, StatsKey

KEY = StatsKey(model_fingerprint="m" * 64, module="model.layers.3.mlp.down_proj", layer=3,
               corpus_fingerprint="c" * 64, tokenizer_hash="t" * 64, max_len=256,
               dtype="float32")


def _sm(n: int, d: int = 6, seed: int = 0) -> SecondMoment:
    sm = SecondMoment(d)
    sm.add(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))
    return sm


def test_every_field_changes_the_key_but_tokens_only_the_full_hash():
    changes = {"model_fingerprint": "x", "module": "other", "layer": 4, "corpus_fingerprint": "y",
               "tokenizer_hash": "z", "max_len": 128, "dtype": "bfloat16", "max_samples": 10,
               "format": 99, "products": "bfloat16"}
    hashes = {KEY.model_copy(update={k: v}).base_hash() for k, v in changes.items()}
    assert len(hashes) == len(changes) and KEY.base_hash() not in hashes
    assert KEY.full_hash(100) != KEY.full_hash(200)
    assert KEY.base_hash() == StatsKey.model_validate(KEY.model_dump()).base_hash()


def test_float32_products_keep_the_names_of_entries_cached_before_the_field():
    from kmec.hashing import canonical_json, sha256_text

    legacy = {k: v for k, v in KEY.model_dump(mode="json").items() if k != "products"}
    assert KEY.products == "float32"
    assert KEY.base_hash() == sha256_text(canonical_json(legacy))
    assert KEY.full_hash(7) == sha256_text(canonical_json({**legacy, "tokens": 7}))


def test_fewer_tokens_reuse_more_tokens_recompute(tmp_path):
    cache = StatsCache(tmp_path)
    assert cache.lookup(KEY, 10) is None
    sm = _sm(50)
    path = cache.save(KEY, sm, requested=50, exhausted=False, corpus="default", model="tiny")
    assert path.parent == tmp_path and path.name == KEY.base_hash() + ".safetensors"
    entry = cache.lookup(KEY, 20)
    assert entry is not None and entry.tokens == 50
    loaded = cache.load(entry)
    assert loaded.count == 50
    assert torch.equal(loaded.moment(torch.float64), sm.moment(torch.float64))
    assert cache.lookup(KEY, 51) is None
    other = KEY.model_copy(update={"corpus_fingerprint": "d" * 64})
    assert cache.lookup(other, 1) is None
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave nothing behind


def test_an_exhausted_corpus_serves_bigger_requests(tmp_path):
    cache = StatsCache(tmp_path)
    cache.save(KEY, _sm(30), requested=1000, exhausted=True)
    assert cache.lookup(KEY, 10_000).tokens == 30


def test_smaller_runs_never_replace_bigger_entries(tmp_path):
    cache = StatsCache(tmp_path)
    cache.save(KEY, _sm(80), requested=80, exhausted=False)
    cache.save(KEY, _sm(20, seed=1), requested=20, exhausted=False)
    assert cache.lookup(KEY, 1).tokens == 80
    cache.save(KEY, _sm(90, seed=2), requested=90, exhausted=False)
    assert cache.lookup(KEY, 1).tokens == 90


def test_entries_and_corrupt_files(tmp_path, caplog):
    cache = StatsCache(tmp_path)
    cache.save(KEY, _sm(10), requested=10, exhausted=False, model="tiny")
    cache.save(KEY.model_copy(update={"layer": 1}), _sm(10), requested=10, exhausted=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    path = cache.path_for(KEY)
    with caplog.at_level(logging.WARNING, logger="kmec"):
        entries = cache.entries()
    assert [e.key.layer for e in entries] == [1, 3]
    assert entries[1].model == "tiny" and entries[1].size > 0
    path.write_bytes(path.read_bytes()[:100])  # truncated: a miss, not a crash
    with caplog.at_level(logging.WARNING, logger="kmec"):
        assert cache.lookup(KEY, 1) is None
    assert "unreadable" in caplog.text
    assert StatsCache(tmp_path / "missing").entries() == []


def test_checkpoint_round_trip(tmp_path):
    cache = StatsCache(tmp_path)
    keys = [KEY, KEY.model_copy(update={"layer": 5})]
    path = cache.checkpoint_path(keys, 1000, rank=1, world=2)
    assert path != cache.checkpoint_path(keys, 1000, rank=0, world=2)
    assert path != cache.checkpoint_path(keys, 2000, rank=1, world=2)
    assert cache.load_checkpoint(path) is None
    acc = {3: _sm(7), 5: _sm(7, seed=3)}
    cache.save_checkpoint(path, acc, position=12, tokens_done=7)
    position, done, states = cache.load_checkpoint(path)
    assert (position, done) == (12, 7) and set(states) == {3, 5}
    restored = SecondMoment.from_state_dict(states[5])
    assert restored.count == 7 and torch.equal(restored.total(), acc[5].total())
    cache.drop_checkpoint(path)
    assert not path.exists()
