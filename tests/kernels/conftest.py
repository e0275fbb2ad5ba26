"""Where the Triton kernels run in these tests: compiled on a CUDA GPU when there is one, else
on the CPU under the Triton interpreter (TRITON_INTERPRET=1).

Triton decides interpreted-or-compiled when `@triton.jit` runs, i.e. at import: triton's own
library functions (tl.max, tl.sum, ... are @jit functions) when triton is imported, our kernels
when their module is. So on a CPU machine this file imports triton with the variable set, and
the `kernel_module` fixture executes each kernel module as a private copy with the variable set,
restoring the environment after each import: the variable never leaks into other test folders,
and `sys.modules` keeps the normal kernel modules for the op() dispatchers.

The private copy's `torch` is wrapped so that `torch.empty*` return NaN-filled tensors: every
output (and split-K scratch buffer) a kernel allocates starts poisoned, and an element the kernel
forgets to write shows up as NaN.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

ON_GPU = torch.cuda.is_available()


@contextlib.contextmanager
def _interpret_env() -> Iterator[None]:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _import_triton_interpreted() -> str | None:
    """Import triton in interpreter mode; returns why not, when it is already imported compiled."""
    if "triton" in sys.modules:
        import triton.language.standard as std

        if type(std.sum).__name__ != "InterpretedFunction":
            return "triton was imported (compiled mode) before tests/kernels: run it on its own"
        return None
    with _interpret_env():
        # triton first (its tl.* library is @jit), then gluon: launches import gluon lazily and
        # assert that its helpers match the interpret setting of that moment.
        import triton
        import triton.experimental.gluon  # noqa: F401
    _patch_interpreter_bf16()
    return None


def _patch_interpreter_bf16() -> None:
    """triton 3.9's interpreter keeps bf16 as raw uint16 and (1) its tl.dot multiplies those
    integers (a bf16 16x16 dot is off by ~1e10), (2) an int -> bf16 cast stores the integer as
    the bit pattern. Route both through fp32: bf16 -> fp32 is exact (bf16 is the top half of an
    fp32) and small ints are exact in bf16, so this fixes the interpreter without hiding any
    rounding the kernel does on a GPU."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_tandem_bf16_fixed", False):
        return
    dot, cast = builder.create_dot, builder.cast_impl

    def upcast(h: Any) -> Any:
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32),
                                        tl.float32)

    def create_dot(self: Any, a: Any, b: Any, *args: Any) -> Any:
        return dot(self, upcast(a), upcast(b), *args)

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar.is_int():
            src = cast(self, src, tl.float32)
        return cast(self, src, dst_type)

    builder.create_dot = create_dot  # type: ignore[method-assign]
    builder.cast_impl = cast_impl  # type: ignore[method-assign]
    builder._tandem_bf16_fixed = True  # type: ignore[attr-defined]


_NOT_INTERPRETABLE = None if ON_GPU else _import_triton_interpreted()


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(-7 if t.dtype.is_signed else 0xAB)


class _PoisonTorch:
    """Forwards to torch, except that the empty* allocators return poisoned tensors."""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in ("empty", "empty_like", "empty_strided"):
            return lambda *a, **kw: _poison(attr(*a, **kw))
        return attr


def _load_private(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    with contextlib.nullcontext() if ON_GPU else _interpret_env():
        spec.loader.exec_module(module)
    module.torch = _PoisonTorch()  # type: ignore[attr-defined]
    return module


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(scope="session")
def kernel_module() -> Callable[[str], types.ModuleType]:
    """kernel_module("kernels.triton_rotary") -> a private copy of that module whose kernels run
    compiled (GPU) or interpreted (CPU) and whose allocations are poisoned."""
    if _NOT_INTERPRETABLE:
        pytest.skip(_NOT_INTERPRETABLE)
    cache: dict[str, types.ModuleType] = {}

    def load(name: str) -> types.ModuleType:
        if name not in cache:
            cache[name] = _load_private(name)
        return cache[name]

    return load
