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


class RescoredHead(nn.Module):
    def __init__(self, rows: torch.Tensor, vocab_size: int,
                 candidates: int = CANDIDATES) -> None:
        """`rows`: the target's float LM head weight [V, hidden] (kept by reference)."""
        super().__init__()
        packed, scales, zeros = quantize_int4_minmax(rows, cpu_w4a8.GROUP)
        self.weights, self.scales = cpu_w4a8.pack(packed, cpu_linear.int4_scale_min(scales,
                                                                                   zeros))
        self.rows = rows
        self.vocab_size = vocab_size
        self.candidates = min(candidates, rows.shape[0])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = cpu_w4a8.linear(hidden, self.weights, self.scales, self.rows.shape[0]).float()
        top = logits.topk(self.candidates, dim=-1).indices  # [n, c]
        exact = torch.einsum("nh,nch->nc", hidden.float(), self.rows[top].float())
        return logits.scatter_(-1, top, exact)[..., :self.vocab_size]


def float_head_rows(model: nn.Module) -> torch.Tensor | None:
    """The target's float LM head weight (its embedding where they are tied and the head runs
    from quantized blocks), or None."""
    weight = getattr(model.lm_head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight
    if model.config.tie_word_embeddings:
        return model.model.embed_tokens.weight
    return None
