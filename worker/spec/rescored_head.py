"""RescoredHead: a self-draft's LM head in 4 bits, its best candidates rescored exactly.

The LM head is a third of a w4a8 draft's bytes in 8 bits (49152 x 576: 31 MB of 97), and a
draft forward is bound by reading them. In 4 bits it reads half, but its rounding flips the
argmax where the top two logits are close: a w4a8 self-draft with an int4 head agreed with
the target on 77% of tokens instead of 96%. Those flips happen among the few best tokens, so
the head scores all rows in 4 bits and then recomputes its `candidates` best exactly from the
target's own float LM head rows (a few KB). The draft's token is then the one the target's
head would pick from the draft's hidden state, as long as it is among the candidates.

Sampled requests draw from the same logits (4-bit, the candidates exact), which is the q the
verifier is given: any q is exact under rejection sampling.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import cpu_linear, cpu_w4a8
from worker.quant.linear import quantize_int4_minmax

CANDIDATES = 16
_BLOCK = 64  # top_candidates looks at the best blocks of this many logits first


class RescoredHead(nn.Module):
    def __init__(self, rows: torch.Tensor, vocab_size: int,
                 candidates: int = CANDIDATES) -> None:
        """`rows`: the target's float LM head weight [V, hidden] (kept by reference)."""
        super().__init__()
        packed, scales, zeros = quantize_int4_minmax(rows, cpu_w4a8.GROUP)
        weights, scales = cpu_w4a8.pack(packed, cpu_linear.int4_scale_min(scales, zeros))
        self.register_buffer("weights", weights)
        self.register_buffer("scales", scales)
        self.rows = rows  # the target's: not this module's weight
        self.vocab_size = vocab_size
        self.candidates = min(candidates, rows.shape[0])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1]).float()  # fp32 in, fp32 logits out
        logits = cpu_w4a8.linear(x, self.weights, self.scales, self.rows.shape[0])
        top = top_candidates(logits, self.candidates)  # [n, c]
        exact = torch.bmm(self.rows[top].float(), x.unsqueeze(-1)).squeeze(-1)
        return logits.scatter_(-1, top, exact)[..., :self.vocab_size]


def top_candidates(logits: torch.Tensor, c: int) -> torch.Tensor:
    """The indices of the c largest logits per row [n, V] (in no particular order).

    torch.topk over 49152 logits took 0.21 ms, a twentieth of a drafted token. The c largest
    lie in the c blocks of _BLOCK with the largest maxima (each block holding one of them has a
    maximum at least the c-th largest value, and at most c blocks do), so the search runs over
    the blocks' maxima and then over c blocks."""
    n, vocab = logits.shape
    if vocab < 4 * c * _BLOCK:
        return logits.topk(c, dim=-1).indices
    pad = -vocab % _BLOCK
    padded = torch.nn.functional.pad(logits, (0, pad), value=float("-inf")) if pad else logits
    blocks = padded.view(n, -1, _BLOCK)
    best = blocks.amax(-1).topk(c, dim=-1).indices  # [n, c]
    index = (best.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK)).view(n, -1)  # [n, c * B]
    pick = padded.gather(1, index).topk(c, dim=-1).indices
    return index.gather(1, pick)


def float_head_rows(model: nn.Module) -> torch.Tensor | None:
    """The target's float LM head weight (its embedding where they are tied and the head runs
    from quantized blocks), or None."""
    weight = getattr(model.lm_head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight
    if model.config.tie_word_embeddings:
        return model.model.embed_tokens.weight
    return None
