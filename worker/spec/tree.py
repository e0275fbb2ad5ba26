"""Token trees for speculative decoding: one verify forward scores several guesses at once.

A tree proposal is a list of tokens and, for each, its parent: -1 for the root (the sequence's
last committed token, which the step feeds first) or the index of an earlier token, so parents
always come before their children. The verify step feeds the root and then the tokens in that
order; each token sits at position root + depth and attends to the past and its own ancestors
only (`tree_holes`, kernels/paged_attention.py). Verification walks down from the root. Greedy
(`walk_greedy`): at each node the target's argmax is compared with the node's children and the
matching child, if any, is accepted. Sampled (`walk_sampled`): the children are tried in turn by
rejection sampling against the target's distribution at the node. The accepted branch's K/V then
move to where a chain would have put them (ModelRunner.move_kv), so the next step sees an
ordinary sequence.

A chain is the tree [-1, 0, 1, ...]. Trees hold at most 63 tokens: the mask of a row is 64 bits.
"""

from __future__ import annotations

import torch

from worker.sampler import draw
from worker.spec.processing import RowProbabilities

MAX_TREE_TOKENS = 63


def is_chain(parents: list[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def depths(parents: list[int]) -> list[int]:
    """Depth of each token below the root (the root's children are at depth 1)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def validate(parents: list[int]) -> None:
    if len(parents) > MAX_TREE_TOKENS:
        raise ValueError(f"a token tree holds at most {MAX_TREE_TOKENS} tokens, got {len(parents)}")
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"token {i} has parent {p}: parents must come before their children")


def tree_holes(parents: list[int]) -> list[int]:
    """Per verify row (the root, then each token): bit j set hides the row j places back."""
    rows = [0]  # ancestor bitmask per row, over rows (bit r = row r); row 0 is the root
    ancestors = [1]
    for i, p in enumerate(parents):
        ancestors.append(ancestors[p + 1] | (1 << (i + 1)))
    for r in range(1, len(parents) + 1):
        hidden = ((1 << (r + 1)) - 1) & ~ancestors[r]
        # bit (r - k) for each hidden row k
        rows.append(sum(1 << (r - k) for k in range(r + 1) if hidden >> k & 1))
    return rows


def _children(parents: list[int]) -> dict[int, list[int]]:
    """Each node's children in order (-1: the root's)."""
    out: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        out.setdefault(p, []).append(i)
    return out


def walk_greedy(best: list[int], tokens: list[int], parents: list[int]) -> tuple[list[int], list[int]]:
    """(emitted tokens, indices of the accepted tree tokens): `best` is the target's argmax at each
    verify row (root first). The emitted tokens are the accepted ones and the target's own
    token after them, exactly what greedy decoding would produce."""
    children = _children(parents)
    node, path, emitted = -1, [], []
    while True:
        want = best[node + 1]
        nxt = next((c for c in children.get(node, ()) if tokens[c] == want), None)
        emitted.append(want)
        if nxt is None:
            return emitted, path
        path.append(nxt)
        node = nxt


def walk_sampled(probs: torch.Tensor | RowProbabilities, tokens: list[int], parents: list[int],
                 generator: torch.Generator | None) -> tuple[list[int], list[int]]:
    """(emitted tokens, indices of the accepted tree tokens) by rejection sampling: `probs`
    [1 + len(tokens), V] is the target's processed distribution at each verify row (root
    first); only the rows of the root and the accepted nodes are read.

    The tree's tokens are point masses (a deterministic guess, no draft distribution), tried in
    order among siblings, as SpecInfer's multi-draft verification does with q = delta: with r the
    node's distribution, a child x is accepted with probability r(x) / sum(r); if it is rejected,
    r(x) = 0 and the next sibling is tried; when none is accepted a token is drawn from r. A
    token y then leaves the node with probability p(y) whatever the children are (for the first
    child p(x1); for the second (1 - p(x1)) * p(x2) / (1 - p(x1)); for a non-child the product of
    the rejections times r(y) / sum(r), which is p(y)), and an accepted child continues under the
    target's distribution after it, so every emitted token follows the target exactly."""
    children = _children(parents)
    node, path, emitted = -1, [], []
    while True:
        row = probs[node + 1]
        total = whole = float(row.sum())
        rejected: dict[int, float] = {}  # token -> its weight, taken out of r
        nxt = None
        for c in children.get(node, ()):
            x = tokens[c]
            px = 0.0 if x in rejected else float(row[x])
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            if px > 0 and u * total < px:
                nxt = c
                break
            rejected[x] = px
            total -= px
        if nxt is None:
            residual = row
            if rejected and total > 1e-6 * whole:
                residual = row.clone()
                residual[list(rejected)] = 0.0
            # else the children held all of p up to rounding: their rejection had p ~ 0
            emitted.append(draw(residual, generator))
            return emitted, path
        emitted.append(tokens[nxt])
        path.append(nxt)
        node = nxt


def branch(tokens: list[int], parents: list[int], node: int) -> list[int]:
    """The tokens from the root's first child down to `node` (-1: the root, none)."""
    out: list[int] = []
    while node >= 0:
        out.append(tokens[node])
        node = parents[node]
    return out[::-1]


def first_branch(tokens: list[int], parents: list[int]) -> list[int]:
    """The chain that follows each node's first child from the root: what a tree becomes where
    it cannot be verified as one (a runner that cannot move K/V, a draft with a distribution)."""
    out: list[int] = []
    node = -1
    for i, p in enumerate(parents):
        if p == node:
            out.append(tokens[i])
            node = i
    return out


def cut(tokens: list[int], parents: list[int], n: int) -> tuple[list[int], list[int]]:
    """The first n tokens of a tree: still a tree, since parents come first."""
    return tokens[:n], parents[:n]
