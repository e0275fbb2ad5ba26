"""Micro-batches for pipeline parallelism: one step's plan cut into pieces of whole sequences.

Why micro-batches of one step (and not pp independent step streams): with the scheduled batch
cut into pp pieces, stage s works on piece m while stage s+1 works on piece m-1, and every
piece's tokens are back on rank 0 before the next step is scheduled. A sequence is therefore in
exactly one in-flight micro-batch, never in two steps at once, and the scheduler, the KV
manager (preemption frees blocks only between steps) and the sampler run unchanged. The price
is a fill/drain bubble per step: stages are busy pp of 2*pp - 1 micro-batch slots (2/3 for
pp=2). Independent step streams (vLLM's virtual engines) remove that bubble, but then the
scheduler must skip sequences whose previous step is still in flight and must never preempt
one, which is a scheduler change for later (docs/parallelism.md).
"""

from __future__ import annotations

import itertools

from protos.messages import StepPlan


def split_plan(plan: StepPlan, pieces: int) -> list[StepPlan]:
    """Cuts a plan into at most `pieces` contiguous runs of sequences with about equal token
    counts. Each run is a complete plan of its own: token indices, query starts and sample
    indices are rebased to the run; concatenating the runs' logits gives the plan's logits."""
    n_seqs = plan.num_seqs
    pieces = max(1, min(pieces, n_seqs))
    if pieces == 1:
        return [plan]
    qs = plan.query_start
    total = qs[-1]
    cuts = [0]  # sequence index where each run starts
    for k in range(1, pieces):
        target = total * k / pieces
        i = cuts[-1] + 1  # at least one sequence per run
        while i < n_seqs - (pieces - k) and qs[i] < target:
            i += 1
        cuts.append(i)
    cuts.append(n_seqs)
    out = []
    for a, b in itertools.pairwise(cuts):
        t0, t1 = qs[a], qs[b]
        out.append(StepPlan(
            step_id=plan.step_id,
            input_ids=plan.input_ids[t0:t1],
            positions=plan.positions[t0:t1],
            slot_mapping=plan.slot_mapping[t0:t1],
            query_start=[q - t0 for q in qs[a:b + 1]],
            seq_lens=plan.seq_lens[a:b],
            block_tables=plan.block_tables[a:b],
            sample_indices=[i - t0 for i in plan.sample_indices if t0 <= i < t1],
            attn_holes=plan.attn_holes[t0:t1],
        ))
    return out
