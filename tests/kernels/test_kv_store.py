"""KV store: Triton (interpreted on CPU) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_store import store_kv_reference
from tests.kernels.kcheck import assert_close


@pytest.mark.parametrize(("dtype", "cache_dtype", "num_kv_heads", "head_dim"), [
    (torch.float32, torch.float32, 2, 64),
    (torch.float16, torch.float16, 8, 128),
    (torch.bfloat16, torch.bfloat16, 3, 80),  # non-power-of-two heads and head dim
    (torch.float32, torch.bfloat16, 1, 64),  # the store casts to the cache's dtype
])
def test_store_kv_matches_reference(
    kernel_module, device, dtype: torch.dtype, cache_dtype: torch.dtype, num_kv_heads: int,
    head_dim: int,
) -> None:
    mod = kernel_module("kernels.triton_kv_store")
    gen = torch.Generator().manual_seed(head_dim + num_kv_heads)
    num_blocks, block_size, tokens = 6, 16, 21
    # K/V come out of a fused QKV projection: strided views, not contiguous tensors.
    kv = torch.randn(tokens, 2, num_kv_heads, head_dim, generator=gen).to(dtype)
    key, value = kv[:, 0], kv[:, 1]
    # Slots across several pages, the last page partly filled, and padding (-1) tokens.
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[3, 11, 20]] = -1
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_reference(key, value, k_ref, v_ref, slots)
    k_dev, v_dev = k_cache.to(device), v_cache.to(device)
    mod.store_kv_triton(key.to(device), value.to(device), k_dev, v_dev, slots.to(device))
    k_out, v_out = k_dev.cpu(), v_dev.cpu()
    if dtype == cache_dtype:
        # Bit-exact over the whole cache: written slots equal, every other slot untouched.
        assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
        return
    # A down-cast store: the interpreter truncates fp32 -> bf16 where torch and the GPU round to
    # nearest, so written slots agree to 1 ulp; untouched slots must still be bit-identical.
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    for out, ref in ((k_out, k_ref), (v_out, v_ref)):
        out, ref = out.view(-1, num_kv_heads, head_dim), ref.view(-1, num_kv_heads, head_dim)
        assert torch.equal(out[~written], ref[~written])
        assert_close(out[written], ref[written], cache_dtype, "written slots")


@pytest.mark.parametrize(("dtype", "num_kv_heads", "head_dim"), [
    (torch.float32, 2, 64), (torch.bfloat16, 3, 80)])
def test_cpu_kernel_is_bit_exact(dtype: torch.dtype, num_kv_heads: int, head_dim: int) -> None:
    """`store_kv` on CPU copies rows in C: written slots equal the reference, padding (-1)
    skipped, every other slot untouched; K/V as strided views of a fused output."""
    from kernels.kv_store import _store_kv_c

    gen = torch.Generator().manual_seed(head_dim)
    kv = torch.randn(21, 2, num_kv_heads, head_dim, generator=gen).to(dtype)
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.randperm(6 * 16, generator=gen)[:21]
    slots[[3, 11, 20]] = -1
    k_cache = torch.randn(6, 16, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(6, 16, num_kv_heads, head_dim, generator=gen).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_reference(key, value, k_ref, v_ref, slots)
    assert _store_kv_c(key, value, k_cache, v_cache, slots), "the C kernel did not run"
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize(("n", "dtype"), [(4, torch.bfloat16), (40, torch.float32)])
def test_row_mover_moves_every_cache_reading_before_writing(n: int, dtype: torch.dtype) -> None:
    """RowMover (the accepted branch of a token tree moving to a chain's slots, in every
    layer's K and V caches): overlapping source and destination lists move as if all rows
    were read first, in every cache, and nothing else changes. 40 fp32 rows of 3 x 64 (30 KB)
    take the C kernel's heap buffer; the torch path must agree."""
    from kernels.kv_store import RowMover

    gen = torch.Generator().manual_seed(n)
    caches = [torch.randn(8, 16, 3, 64, generator=gen).to(dtype) for _ in range(5)]
    perm = torch.randperm(128, generator=gen)
    src = perm[:n].tolist()
    dst = [*src[1:], int(perm[n])]  # dst overlaps src: each row takes the next one's slot
    want = [c.clone() for c in caches]
    for c in want:
        flat = c.view(-1, 3, 64)
        flat[dst] = flat[src].clone()
    mover = RowMover(caches)
    assert mover._c == (_library_loaded())
    mover(src, dst)
    for got, ref in zip(caches, want, strict=True):
        assert torch.equal(got, ref)
    torch_caches = [c.clone() for c in want]
    torch_mover = RowMover(torch_caches)
    torch_mover._c = False
    torch_mover(dst, src)  # and back, through torch ops
    for got, ref in zip(torch_caches, want, strict=True):
        flat = ref.view(-1, 3, 64)
        flat[src] = flat[dst].clone()
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="in \\[0, 128\\)"):
        mover([0], [128])  # the C kernel would write past the cache


def _library_loaded() -> bool:
    from kernels.kv_store import _library

    return _library() is not None
