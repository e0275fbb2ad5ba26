"""Rotary position embedding, neox layout (rotate halves), applied from a cos/sin cache.

Scaling (llama3, linear, ...) is baked into the cache by the model's rotary layer, so this op
only gathers by position and rotates.
"""

from __future__ import annotations

import torch

from kernels._dispatch import use_triton


def rotary_embedding_reference(
    positions: torch.Tensor,  # [T] int64
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [max_pos, rot_dim] fp32: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:
    # Like Hugging Face: cos/sin are computed in fp32, then the rotation runs in the model dtype.
    cos_sin = cos_sin_cache.index_select(0, positions).to(query.dtype)
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot_dim = cos.shape[-1] * 2
        x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)

    return rotate(query), rotate(key)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(query):
        from kernels.triton_rotary import rotary_embedding_triton

        return rotary_embedding_triton(positions, query, key, cos_sin_cache)
    return rotary_embedding_reference(positions, query, key, cos_sin_cache)
