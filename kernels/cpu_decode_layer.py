"""CPU binding of the fused decoder layer (kernels/csrc/decode_layer.c) for small decode steps.

A decode step of one to a few sequences streams the weights in a few milliseconds, but the ~30
torch ops per layer cost as much again in Python dispatch. `run_layer` does a whole Llama-family
layer in one call, chaining the C kernels with the torch path's rounding points. Models describe
each layer once (`LayerSpec`, which keeps its tensors alive) and each step once (`StepSpec`).
Used at tensor-parallel size 1 only: the layer has no all-reduce.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from kernels import cpu_linear
from kernels.cpu_library import load
from kernels.cpu_paged_attention import MAX_BLOCK, MAX_GROUP, MAX_HEAD_DIM

LIN_F32, LIN_BF16, LIN_INT8, LIN_INT4, LIN_W4A8 = 0, 1, 2, 3, 4
MAX_ROWS = 8  # steps of up to this many tokens (beyond, torch's GEMMs win and dispatch is amortized)
# All-bf16 layers on AMX take steps of up to 512 tokens: decode batches and prefill chunks alike.
# The matmuls cost the same up to 16 rows and run on AMX tiles beyond; whole prefills measured
# faster here than torch's path up to 512 tokens (24 tokens 33 -> 20 ms, 512: 274 -> 211 ms) and
# slower past it (1024: 632 against 842 ms), where attention over every earlier key per row
# costs more than torch's flash attention. A row is then computed as a decode computes it,
# whatever else the step holds, so a prompt gives the same logits whether its prefix was cached
# (only its last tokens recomputed) or not.
MAX_ROWS_AMX = 512

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _i64), ("group", _i64), ("n", _i64), ("k", _i64), ("w", _ptr),
                ("scales", _ptr), ("bias", _ptr)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("ln1", _ptr), ("ln2", _ptr), ("k_cache", _ptr), ("v_cache", _ptr),
                ("cos_sin", _ptr), ("hidden", _i64), ("intermediate", _i64),
                ("num_heads", _i64), ("num_kv_heads", _i64), ("head_dim", _i64),
                ("block_size", _i64), ("window", _i64), ("rot_dim", _i64), ("eps", _f32),
                ("scale", _f32)]


class _Step(ctypes.Structure):
    _fields_ = [("m", _i64), ("positions", _ptr), ("slots", _ptr), ("tables", _ptr),
                ("table_stride", _i64), ("seq_lens", _ptr), ("rows", _ptr), ("holes", _ptr),
                ("work", _ptr),
                ("bf16", _i64), ("num_threads", _i64)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load()
    if lib is None:
        return None
    expected = 1000 + ctypes.sizeof(_Linear) * 10 + ctypes.sizeof(_Layer) + ctypes.sizeof(_Step)
    if lib.decode_layer_abi() != expected:
        return None
    lib.decode_layer.argtypes = [ctypes.POINTER(_Layer), ctypes.POINTER(_Step), _ptr, _ptr, _ptr,
                                 _ptr]
    lib.decode_layer.restype = None
    lib.decode_layers.argtypes = [ctypes.POINTER(_Layer), _i64, ctypes.POINTER(_Step), _ptr, _ptr,
                                  _ptr, _ptr, _ptr, _ptr]
    lib.decode_layers.restype = None
    lib.decode_layer_workspace_bytes.argtypes = [ctypes.POINTER(_Layer), _i64, _i64]
    lib.decode_layer_workspace_bytes.restype = ctypes.c_size_t
    return lib


def available(dtype: torch.dtype) -> bool:
    """Whether fused layers run here for a model of this dtype."""
    if dtype not in (torch.float32, torch.bfloat16) or _library() is None:
        return False
    needed = cpu_linear.BF16 if dtype == torch.bfloat16 else cpu_linear.INT8  # INT8 implies fp32
    return cpu_linear.supports(needed | cpu_linear.INT8 | cpu_linear.INT4)


@dataclass
class LinearSpec:
    """One matmul of the layer: y = x @ W.T (+ bias), W in one of the five CPU layouts."""

    kind: int
    weight: torch.Tensor  # [N, K] float / int8; int4: packed uint8 [N, K/2]; w4a8: cpu_w4a8's
    out_features: int
    in_features: int
    scales: torch.Tensor | None = None  # int8: [N] fp32; int4: [N, K/g, 2] fp32 (scale, min)
    # (w4a8: cpu_w4a8's layout)
    group: int = 0
    bias: torch.Tensor | None = None

    def struct(self) -> _Linear:
        return _Linear(self.kind, self.group, self.out_features, self.in_features,
                       self.weight.data_ptr(),
                       None if self.scales is None else self.scales.data_ptr(),
                       None if self.bias is None else self.bias.data_ptr())


class LayerSpec:
    """A decoder layer's weights, norms, rotary cache and KV cache, described once."""

    def __init__(self, *, qkv: LinearSpec, o: LinearSpec, gate_up: LinearSpec,
                 down: LinearSpec, ln1: torch.Tensor, ln2: torch.Tensor, eps: float,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, cos_sin_cache: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None) -> None:
        linears = (qkv, o, gate_up, down)
        tensors = [ln1, ln2, k_cache, v_cache, cos_sin_cache]
        for lin in linears:
            tensors += [t for t in (lin.weight, lin.scales, lin.bias) if t is not None]
        if not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
            raise ValueError("fused decode layers need contiguous CPU tensors")
        if (num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP
                or head_dim > MAX_HEAD_DIM or k_cache.shape[1] > MAX_BLOCK
                or cos_sin_cache.dtype != torch.float32):
            raise ValueError("layer shape outside the fused kernel's limits")
        self._keep = tensors  # the struct holds raw pointers into these
        self.dtype = ln1.dtype
        self.hidden = ln1.shape[0]
        self.struct = _Layer(
            qkv.struct(), o.struct(), gate_up.struct(), down.struct(), ln1.data_ptr(),
            ln2.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), cos_sin_cache.data_ptr(),
            self.hidden, gate_up.out_features // 2, num_heads, num_kv_heads, head_dim,
            k_cache.shape[1], sliding_window or 0, cos_sin_cache.shape[1], eps, scale)

        self.all_bf16 = all(lin.kind == LIN_BF16 for lin in linears)

    def workspace_bytes(self, rows: int) -> int:
        return _library().decode_layer_workspace_bytes(ctypes.byref(self.struct), rows,
                                                       int(self.dtype == torch.bfloat16))


def max_rows(specs: list[LayerSpec]) -> int:
    """The most tokens a step may have to run through these fused layers."""
    if specs and all(s.all_bf16 for s in specs) and cpu_linear.amx_available():
        return MAX_ROWS_AMX
    return MAX_ROWS


class StepSpec:
    """One step of a few tokens. Each row attends as a decode of its own: to its sequence's
    pages up to and including its own position. A step's K/V are all stored before any row
    attends, so a sequence with several new tokens (a speculative verify, a short prefill chunk)
    gets causal attention from per-row lengths over a shared block table. A row's length counts
    its sequence's tokens up to its own index in the step, not its position: a token tree's rows
    share positions. `holes` (optional, [rows] int64) hides keys from a row for tree attention
    (kernels/paged_attention.py)."""

    @classmethod
    def for_tokens(cls, positions: torch.Tensor, slot_mapping: torch.Tensor,
                   block_tables: torch.Tensor, query_start: list[int], seq_lens: list[int],
                   layer: LayerSpec, holes: torch.Tensor | None = None) -> StepSpec:
        """Rows for the flattened tokens of a step: sequence i owns query_start[i:i+2] and holds
        seq_lens[i] tokens after it."""
        counts = [query_start[i + 1] - query_start[i] for i in range(len(query_start) - 1)]
        if any(c != 1 for c in counts):
            owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
            block_tables = block_tables.index_select(0, owner)
            lens = torch.tensor([n - c + j + 1 for n, c in zip(seq_lens, counts)
                                 for j in range(c)], dtype=torch.int32)
        else:
            lens = torch.tensor(seq_lens, dtype=torch.int32)
        return cls(positions, slot_mapping, block_tables, lens, layer, holes)

    def __init__(self, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, layer: LayerSpec,
                 holes: torch.Tensor | None = None) -> None:
        m = positions.numel()
        self._keep = [positions.contiguous(), slot_mapping.contiguous(),
                      block_tables.contiguous(), seq_lens.contiguous(),
                      torch.arange(m, dtype=torch.int32),
                      torch.empty(layer.workspace_bytes(m), dtype=torch.uint8)]
        pos, slots, tables, lens, rows, work = self._keep
        assert pos.dtype == slots.dtype == torch.int64
        assert tables.dtype == lens.dtype == torch.int32
        if holes is not None:
            holes = holes.contiguous()
            assert holes.dtype == torch.int64 and holes.numel() == m
            self._keep.append(holes)
        self.rows = m
        self.struct = _Step(m, pos.data_ptr(), slots.data_ptr(), tables.data_ptr(),
                            tables.stride(0), lens.data_ptr(), rows.data_ptr(),
                            None if holes is None else holes.data_ptr(), work.data_ptr(),
                            int(layer.dtype == torch.bfloat16), torch.get_num_threads())


def run_layer(layer: LayerSpec, step: StepSpec, x: torch.Tensor,
              residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_out, residual_out) of one decoder layer, as the torch layer returns them."""
    assert x.dtype == layer.dtype and x.is_contiguous() and x.shape == (step.rows, layer.hidden)
    if residual is not None:
        assert residual.dtype == x.dtype and residual.is_contiguous()
    x_out, res_out = torch.empty_like(x), torch.empty_like(x)
    _library().decode_layer(ctypes.byref(layer.struct), ctypes.byref(step.struct), x.data_ptr(),
                            None if residual is None else residual.data_ptr(), x_out.data_ptr(),
                            res_out.data_ptr())
    return x_out, res_out


class LayerStack:
    """A stage's fused layers as one C array, run by one call per step (`run_layers`): the step
    thread then retakes the GIL once per forward instead of once per layer, which matters when
    a replica's event loop and Ray's threads share the process."""

    def __init__(self, specs: list[LayerSpec]) -> None:
        self.specs = specs  # keeps the tensors the structs point into alive
        self.array = (_Layer * len(specs))(*(s.struct for s in specs))


def run_layers(stack: LayerStack, step: StepSpec, x: torch.Tensor,
               residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """run_layer over every layer of the stack, in one call."""
    first = stack.specs[0]
    assert x.dtype == first.dtype and x.is_contiguous() and x.shape == (step.rows, first.hidden)
    if residual is not None:
        assert residual.dtype == x.dtype and residual.is_contiguous()
    x_out, res_out, tmp_x, tmp_res = (torch.empty_like(x) for _ in range(4))
    _library().decode_layers(stack.array, len(stack.specs), ctypes.byref(step.struct),
                             x.data_ptr(), None if residual is None else residual.data_ptr(),
                             x_out.data_ptr(), res_out.data_ptr(), tmp_x.data_ptr(),
                             tmp_res.data_ptr())
    return x_out, res_out
