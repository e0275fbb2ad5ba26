"""DispatchPolicy: picks the replica for a new request.

Least outstanding work, with prefix affinity: prompts that start with the same full KV blocks
go to the replica that already holds those blocks in its prefix cache, unless that replica is
much busier than the least-loaded one. Pure Python; the router calls it on the event loop.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import NamedTuple


class ReplicaLoad(NamedTuple):
    """Work a replica holds for this router: unfinished requests and their tokens (prompt plus
    output so far, roughly the KV cache they occupy)."""

    requests: int
    tokens: int


class DispatchPolicy:
    def __init__(self, block_size: int, *, prefix_blocks: int = 16, cache_size: int = 100_000,
                 load_factor: float = 2.0, load_slack_tokens: int = 4096) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        self.block_size = block_size
        self.prefix_blocks = prefix_blocks
        self.cache_size = cache_size
        self.load_factor = load_factor
        self.load_slack_tokens = load_slack_tokens
        # chained prefix hash -> replica that last got a prompt with that prefix; oldest first.
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def prefix_hashes(self, token_ids: Sequence[int], salt: str | None = None) -> list[bytes]:
        """Chained hashes of the prompt's first full blocks (at most prefix_blocks of them).

        Hash i covers blocks 0..i, like the replica's prefix cache, so equal hashes mean equal
        prefixes. The salt is mixed in because differently salted requests never share blocks.
        """
        n = min(self.prefix_blocks, len(token_ids) // self.block_size)
        digest = hashlib.blake2b((salt or "").encode(), digest_size=16).digest()
        hashes = []
        for i in range(n):
            block = token_ids[i * self.block_size:(i + 1) * self.block_size]
            digest = hashlib.blake2b(digest + array("q", block).tobytes(), digest_size=16).digest()
            hashes.append(digest)
        return hashes

    def choose(self, token_ids: Sequence[int], loads: Mapping[str, ReplicaLoad],
               salt: str | None = None) -> str:
        """Returns the replica id for a prompt and remembers it as the owner of its prefix."""
        if not loads:
            raise ValueError("no replica to choose from")
        # Ties go to the lowest id so that the choice is reproducible.
        least = min(loads, key=lambda r: (loads[r].tokens, loads[r].requests, r))
        hashes = self.prefix_hashes(token_ids, salt)
        chosen = least
        preferred = self._deepest_owner(hashes, loads)
        if preferred is not None and preferred != least:
            limit = loads[least].tokens * self.load_factor + self.load_slack_tokens
            if loads[preferred].tokens <= limit:
                chosen = preferred
        for h in hashes:
            self._owner[h] = chosen
            self._owner.move_to_end(h)
        while len(self._owner) > self.cache_size:
            self._owner.popitem(last=False)
        return chosen

    def forget_replica(self, replica_id: str) -> None:
        """Drops every prefix owned by a replica that left (its cache is gone with it)."""
        for h in [h for h, r in self._owner.items() if r == replica_id]:
            del self._owner[h]

    def _deepest_owner(self, hashes: list[bytes], loads: Mapping[str, ReplicaLoad]) -> str | None:
        for h in reversed(hashes):
            owner = self._owner.get(h)
            if owner is not None and owner in loads:
                return owner
        return None
