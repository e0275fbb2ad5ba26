"""DispatchPolicy: least outstanding work, with prefix affinity."""

from __future__ import annotations

import pytest

from router.dispatch import DispatchPolicy, ReplicaLoad

IDLE = ReplicaLoad(0, 0)


def test_prefix_hashes_cover_full_blocks_only_and_chain() -> None:
    policy = DispatchPolicy(block_size=4, prefix_blocks=3)
    a = policy.prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = policy.prefix_hashes([1, 2, 3, 4, 5, 6, 7, 0, 9, 9, 9, 9, 9, 9])
    assert len(a) == 2  # the 9th token is a partial block
    assert len(b) == 3  # capped at prefix_blocks
    assert a[0] == b[0]  # same first block
    assert a[1] != b[1]  # second block differs, and so does everything chained after it
    assert policy.prefix_hashes([1, 2, 3]) == []
    assert policy.prefix_hashes([1, 2, 3, 4], salt="x") != policy.prefix_hashes([1, 2, 3, 4])


def test_least_loaded_by_tokens_then_requests_then_id() -> None:
    policy = DispatchPolicy(block_size=4, prefix_blocks=0)
    loads = {"a": ReplicaLoad(1, 50), "b": ReplicaLoad(3, 20), "c": ReplicaLoad(2, 20)}
    assert policy.choose([1, 2, 3], loads) == "c"
    assert policy.choose([1, 2, 3], {"b": IDLE, "a": IDLE}) == "a"
    with pytest.raises(ValueError, match="no replica"):
        policy.choose([1], {})


def test_affinity_holds_within_slack_and_breaks_beyond_factor() -> None:
    policy = DispatchPolicy(block_size=2, load_factor=2.0, load_slack_tokens=10)
    prompt = [1, 2, 3, 4, 5]
    assert policy.choose(prompt, {"a": IDLE, "b": IDLE}) == "a"
    # "a" is busier but within 2 * 0 + 10 tokens: the prefix stays there.
    assert policy.choose(prompt, {"a": ReplicaLoad(1, 10), "b": IDLE}) == "a"
    # Beyond: go to the least loaded, which now owns the prefix.
    assert policy.choose(prompt, {"a": ReplicaLoad(2, 11), "b": IDLE}) == "b"
    assert policy.choose(prompt, {"a": IDLE, "b": ReplicaLoad(1, 5)}) == "b"
    # A prompt sharing only the first block still follows its deepest known owner.
    assert policy.choose([1, 2, 9, 9], {"a": IDLE, "b": ReplicaLoad(1, 5)}) == "b"


def test_affinity_ignores_replicas_not_offered_and_forgets_removed_ones() -> None:
    policy = DispatchPolicy(block_size=2)
    assert policy.choose([5, 6, 7, 8], {"b": IDLE}) == "b"
    assert policy.choose([5, 6, 7, 8], {"a": IDLE, "c": ReplicaLoad(0, 1)}) == "a"
    policy.forget_replica("a")
    assert policy.choose([5, 6, 7, 8], {"a": ReplicaLoad(1, 1), "b": IDLE}) == "b"


def test_prefix_memory_is_bounded_lru() -> None:
    policy = DispatchPolicy(block_size=1, prefix_blocks=1, cache_size=2)
    loads = {"a": IDLE, "b": IDLE}
    policy.choose([1], {"b": IDLE})
    policy.choose([2], {"b": IDLE})
    policy.choose([1], {"b": IDLE})  # touch: [1] is now the newest
    policy.choose([3], {"b": IDLE})  # evicts [2]
    assert policy.choose([1], loads) == "b"
    assert policy.choose([2], loads) == "a"  # forgotten: least loaded wins the tie
