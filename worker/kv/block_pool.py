"""Physical KV blocks: reference counts, an O(1) LRU free queue and the prefix-cache index.

A block whose reference count drops to zero goes to the free queue but keeps its hash, so a later
request with the same prefix can take it back (a prefix-cache hit) until it is evicted, oldest
first, to serve a new allocation.
"""

from __future__ import annotations

from collections import OrderedDict


class Block:
    __slots__ = ("block_hash", "block_id", "ref_cnt", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None  # to confirm a hash hit

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: the front is evicted first. OrderedDict gives O(1)
        # append, pop-front and removal from the middle (a cache hit on a free block).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, Block] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[Block]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> Block | None:
        block = self._cached.get(block_hash)
        if block is not None and block.token_ids == token_ids:
            return block
        return None

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: list[Block]) -> None:
        # Tail blocks of a sequence are the least likely to be shared: freed in reverse so they
        # are evicted before the prefix they extend. Blocks with no hash hold nothing reusable and
        # go to the front.
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"{block} released more often than taken")
            if block.ref_cnt == 0:
                self._free[block.block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def register(self, block: Block, block_hash: int, token_ids: tuple[int, ...]) -> None:
        """Make a full, computed block findable by its chained hash."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # another block already holds this content; keep the first
        block.block_hash = block_hash
        block.token_ids = token_ids
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None
            block.token_ids = None
