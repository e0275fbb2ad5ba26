"""CPU binding of kernels/csrc/eagle_draft.c: one drafting call of an EAGLE head, from token
ids and features to its feature guesses and top tokens, in one C call.

Drafting runs the head two to four times per speculative step, a few rows each time; around
the ~0.55 ms of kernels a call took ~0.65 ms of small torch ops through Python (2-vCPU Xeon).
Here Python passes lists and gets lists back. One call may carry rows of several sequences: a
batch's drafts then stream the head's weights once per depth, not once per sequence.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels import cpu_decode_layer as fused

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = fused._library()
    if lib is None:
        return None
    lay, lin = ctypes.POINTER(fused._Layer), ctypes.POINTER(fused._Linear)
    lib.eagle_draft.argtypes = [lay, lin, _ptr, _ptr, _f32, lin, _i64, _ptr, _ptr, _ptr, _ptr,
                                _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr,
                                _i64, _i64]
    lib.eagle_draft.restype = None
    lib.eagle_draft_workspace_bytes.argtypes = [lay, _i64, _i64, _i64]
    lib.eagle_draft_workspace_bytes.restype = ctypes.c_size_t
    return lib


class DraftCall:
    """An EAGLE head as the kernel reads it: its decoder layer (with the head's KV pool), the
    input fusion `fc` ([hidden, 2 * hidden]), the target's embedding ([vocab, hidden]), the
    output norm and the head's LM head rows ([draft vocab, hidden]), all in one dtype. The
    layer's KV pool has `num_blocks` pages and its rotary table `max_position` rows: a call is
    checked against them, since the kernel reads and writes wherever it is pointed."""

    def __init__(self, layer: fused.LayerSpec, fc: torch.Tensor, embed: torch.Tensor,
                 out_norm: torch.Tensor, eps: float, head: torch.Tensor, *, num_blocks: int,
                 max_position: int) -> None:
        dtype = layer.dtype
        tensors = (fc, embed, out_norm, head)
        if not all(t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
                   for t in tensors):
            raise ValueError("the drafting kernel needs contiguous CPU tensors of the "
                             "layer's dtype")
        kind = fused.LIN_BF16 if dtype == torch.bfloat16 else fused.LIN_F32
        self.layer = layer
        self.hidden = layer.hidden
        self.vocab = head.shape[0]
        self.dtype = dtype
        self._keep = tensors  # the structs hold raw pointers into these
        self._fc = fused._Linear(kind, 0, fc.shape[0], fc.shape[1], fc.data_ptr(), None, None)
        self._head = fused._Linear(kind, 0, head.shape[0], head.shape[1], head.data_ptr(),
                                   None, None)
        self._embed, self._norm, self._eps = embed.data_ptr(), out_norm.data_ptr(), eps
        self._tokens, self._blocks, self._positions = embed.shape[0], num_blocks, max_position
        # One buffer, grown to the largest call so far (the workspace grows with the rows, and
        # a call of m rows uses its first bytes): calls take any size up to the fused layer's
        # limit, 512 rows with AMX.
        self._work, self._work_rows = torch.empty(0, dtype=torch.uint8), 0

    def _workspace(self, m: int) -> torch.Tensor:
        if m > self._work_rows:
            size = _library().eagle_draft_workspace_bytes(
                ctypes.byref(self.layer.struct), m, self.vocab, int(self.dtype == torch.bfloat16))
            self._work, self._work_rows = torch.empty(size, dtype=torch.uint8), m
        return self._work

    def __call__(self, tokens: list[int], features: torch.Tensor, positions: list[int],
                 tables: list[list[int]], seq_of_row: list[int], cache_rows: list[int],
                 holes: list[int] | None, scored_rows: list[int], width: int,
                 ) -> tuple[torch.Tensor, list[list[int]], list[list[float]]]:
        """Feature guesses for len(tokens) rows, row i stored at row cache_rows[i] of the head
        cache of sequence seq_of_row[i], whose pool pages are tables[seq_of_row[i]]; and for
        the rows `scored_rows` the `width` likeliest draft-vocabulary ids with their
        log-probabilities, best first."""
        m = len(tokens)
        assert features.shape == (m, self.hidden) and features.dtype == self.dtype
        assert width >= 1 and len(positions) == m == len(seq_of_row) == len(cache_rows)
        page = self.layer.struct.block_size
        if m == 0 or (holes is not None and len(holes) != m):
            raise ValueError(f"a drafting call needs rows, and a hole mask per row ({m} rows)")
        if not all(0 <= i < m for i in scored_rows):
            raise ValueError(f"scored rows {scored_rows} outside the call's {m} rows")
        if not all(0 <= t < self._tokens for t in tokens):
            raise ValueError(f"token ids {tokens} outside the embedding's {self._tokens} rows")
        if not all(0 <= q < self._positions for q in positions):
            raise ValueError(f"positions {positions} outside the rotary table's "
                             f"{self._positions} rows")
        if not all(0 <= s < len(tables) for s in seq_of_row):
            raise ValueError(f"rows of sequences {seq_of_row}, but {len(tables)} page tables")
        for s, c in zip(seq_of_row, cache_rows):
            table = tables[s]
            if c < 0 or len(table) * page <= c or not all(0 <= b < self._blocks for b in table):
                raise ValueError(f"row {c} needs {c // page + 1} pages of the pool's "
                                 f"{self._blocks}; the table has {table}")
        stride = max(len(t) for t in tables)
        flat = [b for t in tables for b in (*t, *(0,) * (stride - len(t)))]
        features = features.contiguous()
        out = torch.empty(m, self.hidden, dtype=self.dtype)
        scored = len(scored_rows)
        ids = (ctypes.c_int64 * max(1, scored * width))()
        logps = (ctypes.c_float * max(1, scored * width))()
        _library().eagle_draft(
            ctypes.byref(self.layer.struct), ctypes.byref(self._fc), self._embed, self._norm,
            self._eps, ctypes.byref(self._head), m, (ctypes.c_int64 * m)(*tokens),
            features.data_ptr(), (ctypes.c_int64 * m)(*positions),
            (ctypes.c_int32 * max(1, len(flat)))(*flat), stride,
            (ctypes.c_int32 * m)(*seq_of_row), (ctypes.c_int64 * m)(*cache_rows),
            None if holes is None else (ctypes.c_uint64 * m)(*holes), scored,
            (ctypes.c_int64 * max(1, scored))(*scored_rows), width,
            out.data_ptr(), ids, logps, self._workspace(m).data_ptr(),
            int(self.dtype == torch.bfloat16), torch.get_num_threads())
        return (out, [ids[i * width:(i + 1) * width] for i in range(scored)],
                [logps[i * width:(i + 1) * width] for i in range(scored)])
