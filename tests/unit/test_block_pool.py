from __future__ import annotations

import pytest

from protos.messages import Request
from worker.kv.block_pool import BlockPool
from worker.kv.kv_manager import KVManager
from worker.sequence import Sequence


def test_lru_eviction_order_and_cache_hits():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.register(a, 111, (1, 2))
    pool.register(b, 222, (3, 4))
    pool.release([a, b])  # freed in reverse: b is evicted before a
    assert pool.num_free == 4
    assert pool.lookup(111, (1, 2)) is a
    assert pool.lookup(111, (9, 9)) is None  # hash hit confirmed against token ids
    got = pool.allocate(2)  # the two never-used blocks first
    assert {x.block_id for x in got} == {2, 3}
    got3 = pool.allocate(1)[0]
    assert got3 is b and pool.lookup(222, (3, 4)) is None  # evicted
    pool.touch([a])
    assert pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_double_release_is_caught():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.release([a])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([a])


def test_kv_manager_prefix_hit_leaves_a_token_to_compute():
    kv = KVManager(num_blocks=16, block_size=4)
    s1 = Sequence(Request(request_id="1", prompt_token_ids=list(range(8))))
    assert kv.can_allocate(s1, 8, [])
    kv.allocate(s1, 8, [])
    s1.num_computed_tokens = 8
    kv.cache_computed_blocks(s1)
    # Same 8 tokens: both blocks are cached but the last token must be recomputed.
    s2 = Sequence(Request(request_id="2", prompt_token_ids=list(range(8))))
    hits = kv.find_cached_prefix(s2)
    assert len(hits) == 1
    s3 = Sequence(Request(request_id="3", prompt_token_ids=list(range(9))))
    assert len(kv.find_cached_prefix(s3)) == 2
    kv.allocate(s3, 1, kv.find_cached_prefix(s3))
    assert s3.block_table[:2] == s1.block_table
    assert s3.num_computed_tokens == 8
    kv.free(s1)
    kv.free(s3)
    assert kv.num_free_blocks == 16


def test_can_allocate_counts_reclaimed_cached_blocks():
    kv = KVManager(num_blocks=3, block_size=4)
    s1 = Sequence(Request(request_id="1", prompt_token_ids=list(range(8))))
    kv.allocate(s1, 8, [])
    s1.num_computed_tokens = 8
    kv.cache_computed_blocks(s1)
    kv.free(s1)
    s2 = Sequence(Request(request_id="2", prompt_token_ids=[*list(range(9)), 50, 51, 52]))
    hits = kv.find_cached_prefix(s2)
    assert len(hits) == 2
    # 2 cached blocks (free, ref 0) + 1 new block needed: exactly the 3 there are.
    assert kv.can_allocate(s2, 4, hits)
    assert not kv.can_allocate(s2, 5, hits)
