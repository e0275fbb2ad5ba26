"""Verification of proposed tokens against the target: lossless by construction.

Greedy (temperature 0): accept the longest prefix of the proposal that equals the target's
argmax at each position, then emit the target's argmax where they first differ (or the bonus
token after the last proposal). The output is exactly what greedy decoding would produce.

Sampled: speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023, Alg. 2). With
target distributions p_0..p_m at the m+1 scored positions and draft distributions q_0..q_{m-1}
from which x_1..x_m were drawn:
  accept x_{j+1} with probability min(1, p_j(x_{j+1}) / q_j(x_{j+1}));
  at the first rejection emit a draw from norm(max(0, p_j - q_j)) and stop;
  if all m are accepted emit a bonus draw from p_m.
Each emitted token is then distributed exactly as p_j: P(x) = min(q(x), p(x)) + (1 - sum_y
min(q(y), p(y))) * max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y)) = p(x). A proposer without
a distribution (n-gram, EAGLE) is a point mass q = delta_x: accept with probability p(x), on
rejection draw from p with x removed; such a chain is walked as a tree with one child per node
(worker/spec/tree.py: walk_sampled).
"""

from __future__ import annotations

import torch

from kernels.argmax import argmax_rows
from worker.sampler import draw
from worker.spec.processing import RowProbabilities
from worker.spec.tree import walk_sampled


def verify_greedy(target_logits: torch.Tensor, proposal: list[int]) -> list[int]:
    """Emitted tokens (accepted proposals + one target token) from processed logits [m+1, V]."""
    best = argmax_rows(target_logits).tolist()
    a = 0
    while a < len(proposal) and best[a] == proposal[a]:
        a += 1
    return [*proposal[:a], best[a]]


def verify_sampled(p: torch.Tensor | RowProbabilities, q: torch.Tensor | None,
                   proposal: list[int], generator: torch.Generator | None) -> list[int]:
    """Emitted tokens by rejection sampling. p: [m+1, V] target probabilities (rows are read
    down to the first rejection only); q: [m, V] draft probabilities, or None for point masses
    at the proposal (a chain walked as the one-child tree it is: worker/spec/tree.py)."""
    m = len(proposal)
    if q is None:
        return walk_sampled(p, proposal, list(range(-1, m - 1)), generator)[0]
    u = torch.rand(m, generator=generator, dtype=torch.float64).tolist() if m else []
    for j, x in enumerate(proposal):
        qx = float(q[j, x])
        if qx > 0 and u[j] * qx < float(p[j][x]):  # u < p/q, i.e. probability min(1, p/q)
            continue
        residual = (p[j] - q[j]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: the rejection had p ~ 0
            residual = p[j]
        return [*proposal[:j], draw(residual, generator)]
    return [*proposal, draw(p[m], generator)]
