"""Rotary embedding (neox): Triton (interpreted on CPU) against the torch reference, and the
reference against the complex-number form of RoPE."""

from __future__ import annotations

import pytest
import torch

from kernels.rotary import rotary_embedding_reference
from tests.kernels.kcheck import assert_close


def make_cache(max_pos: int, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


def test_reference_matches_complex_rotation() -> None:
    pos = torch.tensor([0, 5, 31])
    q, k = torch.randn(3, 2, 64), torch.randn(3, 1, 64)
    cache = make_cache(32, 32)  # partial rotary: the last 32 dims pass through
    q_out, _ = rotary_embedding_reference(pos, q, k, cache)
    # neox pairs dim i with i + rot_dim/2 and multiplies (x_i + i x_{i+h}) by e^{i m theta_i}.
    z = torch.complex(q[..., :16].double(), q[..., 16:32].double())
    angle = torch.atan2(cache[pos, 16:].double(), cache[pos, :16].double()).unsqueeze(1)
    z = z * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat((z.real, z.imag, q[..., 32:].double()), dim=-1)
    assert_close(q_out, expected, torch.float32)


@pytest.mark.parametrize(("dtype", "heads", "head_dim", "rot_dim"), [
    (torch.float32, (4, 4), 64, 64),
    (torch.float16, (8, 2), 128, 128),
    (torch.bfloat16, (8, 1), 64, 64),
    (torch.float32, (4, 2), 128, 64),  # partial rotary (e.g. rotary_pct = 0.5)
    (torch.float16, (6, 2), 80, 80),  # head dim not a power of two
])
def test_rotary_matches_reference(
    kernel_module, device, dtype: torch.dtype, heads: tuple[int, int], head_dim: int,
    rot_dim: int,
) -> None:
    mod = kernel_module("kernels.triton_rotary")
    gen = torch.Generator().manual_seed(head_dim * 7 + heads[0])
    num_heads, num_kv_heads = heads
    tokens = 9
    # q and k as the engine gets them: strided views into one fused QKV output.
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :num_heads * head_dim].view(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(
        tokens, num_kv_heads, head_dim)
    pos = torch.randint(0, 200, (tokens,), generator=gen)
    cache = make_cache(200, rot_dim)
    q_ref, k_ref = rotary_embedding_reference(pos, q, k, cache)
    q_out, k_out = mod.rotary_embedding_triton(pos.to(device), q.to(device), k.to(device),
                                               cache.to(device))
    assert_close(q_out.cpu(), q_ref, dtype, "query")
    assert_close(k_out.cpu(), k_ref, dtype, "key")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_cpu_kernel_is_bit_identical_to_reference(dtype: torch.dtype, rot_dim: int) -> None:
    """`rotary_embedding` on CPU rotates q and k in place in C with the reference's rounding
    (cos/sin and each product rounded to the model dtype): bit-identical outputs, on q/k that are
    views into a fused QKV row, as the attention layer passes them."""
    from kernels.rotary import rotary_embedding

    gen = torch.Generator().manual_seed(rot_dim)
    pos = torch.tensor([0, 7, 300, 5, 4095, 1])
    qkv = torch.randn(6, (4 + 2 * 2) * 64, generator=gen).to(dtype)
    q, k, _ = qkv.split([4 * 64, 2 * 64, 2 * 64], dim=-1)
    q, k = q.view(6, 4, 64), k.view(6, 2, 64)
    cache = make_cache(4096, rot_dim)
    ref_q, ref_k = rotary_embedding_reference(pos, q.clone(), k.clone(), cache)
    out_q, out_k = rotary_embedding(pos, q, k, cache)
    assert out_q.data_ptr() == q.data_ptr(), "the CPU kernel did not run (or not in place)"
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
