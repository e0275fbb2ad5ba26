"""Per-sequence block tables on top of the block pool, with prefix caching.

Admission is asked before it is done (nano-vllm's shape): `can_allocate`/`allocate` for a sequence
entering the running set, `can_append`/`append` for a running one that needs room for this step's
tokens (plus lookahead slots for speculative tokens).
"""

from __future__ import annotations

from worker.kv.block_pool import Block, BlockPool
from worker.sequence import Sequence


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    # -- hashing ---------------------------------------------------------------------------

    def _update_hashes(self, seq: Sequence, upto_blocks: int) -> None:
        """Extend seq.block_hashes to cover its first `upto_blocks` full blocks.

        Each hash chains its parent's, so equal hashes mean equal whole prefixes (up to collisions,
        which `BlockPool.lookup` rules out by comparing token ids). The cache salt separates
        tenants that must not share KV.
        """
        bs = self.block_size
        hashes = seq.block_hashes
        parent = hashes[-1] if hashes else hash(("tandem-kv", seq.request.cache_salt))
        for i in range(len(hashes), upto_blocks):
            parent = hash((parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
            hashes.append(parent)

    def find_cached_prefix(self, seq: Sequence) -> list[Block]:
        """Blocks of the longest cached prefix of a new sequence. At least one token is always left
        to compute, since the last position's logits are needed to sample."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        self._update_hashes(seq, max_blocks)
        hits: list[Block] = []
        for i in range(max_blocks):
            block = self.pool.lookup(seq.block_hashes[i],
                                     tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            if block is None:
                break
            hits.append(block)
        return hits

    # -- admission -------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[Block]) -> bool:
        needed = _cdiv(len(cached) * self.block_size + num_new_tokens, self.block_size) - len(cached)
        # Cached blocks nobody holds sit in the free queue; taking them shrinks it.
        reclaimed = sum(1 for b in cached if b.ref_cnt == 0)
        return needed <= self.pool.num_free - reclaimed

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[Block]) -> None:
        assert not seq.block_table, f"{seq} already holds blocks"
        self.pool.touch(cached)
        num_cached_tokens = len(cached) * self.block_size
        needed = _cdiv(num_cached_tokens + num_new_tokens, self.block_size) - len(cached)
        blocks = cached + self.pool.allocate(needed)
        seq.block_table = [b.block_id for b in blocks]
        seq.num_registered_blocks = len(cached)
        seq.num_computed_tokens = num_cached_tokens
        if seq.num_cached_tokens == 0:  # a recompute after preemption keeps the first count
            seq.num_cached_tokens = num_cached_tokens
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += num_cached_tokens

    def can_append(self, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0) -> bool:
        total = seq.num_computed_tokens + num_new_tokens + num_lookahead
        return _cdiv(total, self.block_size) - len(seq.block_table) <= self.pool.num_free

    def append(self, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0) -> None:
        total = seq.num_computed_tokens + num_new_tokens + num_lookahead
        needed = _cdiv(total, self.block_size) - len(seq.block_table)
        if needed > 0:
            seq.block_table.extend(b.block_id for b in self.pool.allocate(needed))

    # -- after a step / at the end ---------------------------------------------------------

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the blocks this sequence has filled completely, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        if full <= seq.num_registered_blocks:
            return
        self._update_hashes(seq, full)
        blocks = self.pool.blocks
        for i in range(seq.num_registered_blocks, full):
            self.pool.register(blocks[seq.block_table[i]], seq.block_hashes[i],
                               tuple(seq.token_ids[i * bs:(i + 1) * bs]))
        seq.num_registered_blocks = full

    def free(self, seq: Sequence) -> None:
        self.pool.release([self.pool.blocks[i] for i in seq.block_table])
        seq.block_table = []
        seq.num_registered_blocks = 0

    def trim_lookahead(self, seq: Sequence) -> None:
        """Give back blocks beyond what the computed tokens need (rejected speculative slots)."""
        keep = _cdiv(seq.num_computed_tokens, self.block_size)
        if len(seq.block_table) > keep:
            extra = seq.block_table[keep:]
            del seq.block_table[keep:]
            self.pool.release([self.pool.blocks[i] for i in extra])
