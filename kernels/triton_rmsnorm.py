"""Triton RMSNorm with the residual add fused: one read of x (and residual), one write of the
output (and the new residual), instead of the three passes the unfused torch code makes.

y = (x / sqrt(mean(x^2) + eps)) * weight, with x = x + residual first when a residual is given.
Rounding follows `rms_norm_reference` (Hugging Face Llama): the sum is rounded to x's dtype (it
becomes the next residual), the normalisation runs in fp32 and is rounded to x's dtype before
the weight multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    # Masked lanes load 0, so the sum over BLOCK equals the sum over n_cols.
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    # torch promotes `normed.to(x.dtype) * weight`, so an fp32 weight gives an fp32 output.
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res2 = res_out = None
    if residual is not None:
        assert residual.dtype == x.dtype, "residual and x must share a dtype"
        res2 = residual.reshape(-1, hidden)
        assert res2.stride(-1) == 1
        res_out = torch.empty_like(x2)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(hidden)
        # One row per program; wider rows get more warps so each thread holds <= ~16 values.
        num_warps = min(16, max(1, block // 512))
        _rms_norm_kernel[(rows,)](
            x2, res2 if res2 is not None else x2, weight, out,
            res_out if res_out is not None else out,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
        )
    out = out.view(x.shape)
    if res_out is None:
        return out
    return out, res_out.view(x.shape)
