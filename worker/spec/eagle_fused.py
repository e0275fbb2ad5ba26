"""The EAGLE head's decoder layer as one call to the CPU fused decode layer, with a paged KV.

A drafted token is one decoder layer on one row: in torch that is ~30 small ops whose dispatch
costs more than the 7 MB of weights take to stream (1.3 ms against ~0.4 ms measured). The
target's decode path already has the fused C layer (kernels/cpu_decode_layer.py); the head is
a standard Llama layer, so it runs there too, over its own small paged KV pool.

Rows of a sequence's head cache are numbered densely (row r lives in slot table[r // B] * B +
r % B) while rotary positions are the tokens' true positions, so positions the head never saw
(a prefix-cache hit) leave no hole in its cache. Rows past a sequence's committed ones are
scratch for the rollout and are overwritten by the next catch-up.
"""

from __future__ import annotations

import torch

from kernels import cpu_decode_layer as fused
from kernels.cpu_eagle_draft import DraftCall
from worker.spec.eagle_head import DraftRequest, DraftResult, EagleHead

BLOCK = 16


class FusedEagleLayer:
    """Runs `EagleHead.layer` rows through the fused kernel; owns the head's KV pool."""

    @staticmethod
    def supported(head: EagleHead) -> bool:
        cfg = head.cfg
        dtype = head.fc.weight.dtype
        return (head.fc.weight.device.type == "cpu" and fused.available(dtype)
                and head.qkv is not None and cfg.num_heads % cfg.num_kv_heads == 0
                and cfg.num_heads // cfg.num_kv_heads <= fused.MAX_GROUP
                and cfg.head_dim <= fused.MAX_HEAD_DIM)

    def __init__(self, head: EagleHead, pool_bytes: int, max_position: int) -> None:
        cfg = head.cfg
        dtype = head.fc.weight.dtype
        self.head = head
        per_block = 2 * BLOCK * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
        num_blocks = max(1, pool_bytes // per_block)
        shape = (num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        ang = torch.arange(max_position, dtype=torch.float32)[:, None] * head.inv_freq[None, :]
        self.cos_sin = torch.cat((ang.cos(), ang.sin()), dim=-1).contiguous()

        def lin(w: torch.Tensor) -> fused.LinearSpec:
            kind = fused.LIN_BF16 if dtype == torch.bfloat16 else fused.LIN_F32
            return fused.LinearSpec(kind, w.contiguous(), w.shape[0], w.shape[1])

        self.spec = fused.LayerSpec(
            qkv=lin(head.qkv), o=lin(head.o_proj.weight.detach()),
            gate_up=lin(head.gate_up.weight.detach()), down=lin(head.down.weight.detach()),
            ln1=head.input_norm.weight.detach(), ln2=head.post_attention_norm.weight.detach(),
            eps=cfg.rms_norm_eps, k_cache=self.k_cache, v_cache=self.v_cache,
            cos_sin_cache=self.cos_sin, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, scale=cfg.head_dim ** -0.5, sliding_window=None)
        self.max_position = max_position
        self.max_rows = fused.max_rows([self.spec])  # rows per kernel call
        self._draft = DraftCall(self.spec, head.fc.weight.detach().contiguous(),
                                head.embed.to(dtype).contiguous(),
                                head.out_norm.weight.detach(), head.out_norm.eps,
                                head.head.to(dtype).contiguous(), num_blocks=num_blocks,
                                max_position=max_position)

    def new_cache(self) -> list[int]:
        """A sequence's cache: the pool pages it holds."""
        return []

    def reserve(self, blocks: list[int], rows: int) -> bool:
        """Grows `blocks` to hold `rows` rows; False (nothing taken) if the pool is short."""
        need = -(-rows // BLOCK) - len(blocks)
        if need > len(self.free_blocks):
            return False
        for _ in range(max(0, need)):
            blocks.append(self.free_blocks.pop())
        return True

    def release(self, blocks: list[int]) -> None:
        self.free_blocks.extend(blocks)
        blocks.clear()

    def read(self, blocks: list[int], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows 0..rows-1, [kv_heads, rows, head_dim] each."""
        index = torch.tensor(blocks, dtype=torch.int64)
        return tuple(c.index_select(0, index).flatten(0, 1)[:rows].transpose(0, 1)
                     for c in (self.k_cache, self.v_cache))

    def draft(self, tokens: list[int], features: torch.Tensor, positions: list[int],
              blocks: list[int], first_row: int, holes: list[int] | None = None,
              scored: int = 0, width: int = 1) -> DraftResult:
        """Feature guesses for len(tokens) rows stored at rows first_row.. of this sequence's
        cache (blocks must cover them), and for the last `scored` rows the `width` likeliest
        draft-vocabulary ids with their log-probabilities, best first. Each row attends to
        rows 0..itself, minus `holes` (tree drafting, as in kernels/paged_attention.py)."""
        return self.draft_batch([DraftRequest(tokens, features, positions, blocks, first_row,
                                              holes, scored, width)])[0]

    def draft_batch(self, requests: list[DraftRequest]) -> list[DraftResult]:
        """`draft` for several sequences: their rows are packed into C calls
        (kernels/csrc/eagle_draft.c) of up to the kernel's row limit, so a batch streams the
        head's weights once per call instead of once per sequence. A request longer than the
        space left in a call (a long catch-up: the prompt, after a prefill) continues in the
        next, whose rows then attend to the ones already in the pool."""
        width = max((r.width for r in requests if r.scored), default=1)
        cap = self.max_rows
        # per call: (request index, first row of the request, rows) for each piece
        calls: list[list[tuple[int, int, int]]] = [[]]
        room = cap
        for i, r in enumerate(requests):
            a, m = 0, len(r.tokens)
            while a < m:
                if room == 0:
                    calls.append([])
                    room = cap
                n = min(room, m - a)
                calls[-1].append((i, a, n))
                room -= n
                a += n
        feats: list[list[torch.Tensor]] = [[] for _ in requests]
        ids: list[list[list[int]]] = [[] for _ in requests]
        logps: list[list[list[float]]] = [[] for _ in requests]
        for pieces in calls:
            if not pieces:
                continue
            # A request has at most one piece per call: piece j is sequence j of the call.
            tokens, positions, seq_of_row, cache_rows, scored_rows = [], [], [], [], []
            holes: list[int] | None = (
                [] if any(requests[i].holes is not None for i, _, _ in pieces) else None)
            scored = []  # per piece: how many of the request's last `scored` rows it holds
            for j, (i, a, n) in enumerate(pieces):
                r = requests[i]
                base = len(tokens)
                tokens += r.tokens[a:a + n]
                positions += r.positions[a:a + n]
                seq_of_row += [j] * n
                cache_rows += range(r.first_row + a, r.first_row + a + n)
                if holes is not None:
                    holes += r.holes[a:a + n] if r.holes is not None else [0] * n
                lo = max(a, len(r.tokens) - r.scored)
                scored.append(max(0, a + n - lo))
                scored_rows += range(base + lo - a, base + n)
            x = torch.cat([requests[i].features[a:a + n] for i, a, n in pieces])
            out, top, lps = self._draft(tokens, x, positions,
                                        [requests[i].cache for i, _, _ in pieces], seq_of_row,
                                        cache_rows, holes, scored_rows, width)
            row = k = 0
            for (i, _, n), s in zip(pieces, scored):
                w = requests[i].width
                feats[i].append(out[row:row + n])
                ids[i] += [t[:w] for t in top[k:k + s]]
                logps[i] += [t[:w] for t in lps[k:k + s]]
                row += n
                k += s
        return [((f[0] if len(f) == 1 else torch.cat(f)) if f else
                 torch.empty(0, self.spec.hidden, dtype=self.spec.dtype), i, lp)
                for f, i, lp in zip(feats, ids, logps)]
