"""The n-gram proposer (a rollout of an n-gram model of the sequence's own tokens) and the step
token budget that caps k per sequence."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernels import cpu_linear
from kernels.cpu_decode_layer import MAX_ROWS
from protos.messages import Request
from tests.engine_utils import greedy, run_to_completion
from tests.spec.test_spec_greedy import PROMPTS, make_engine, run
from worker.spec.config import SpeculativeConfig
from worker.spec.factory import SPEC_STEP_TOKENS_AMX, resolve_max_step_tokens
from worker.spec.proposer import NgramProposer, Proposal, Proposer


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama-gqa")


def seq(tokens: list[int], rid: str = "r") -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, token_ids=tokens)


def test_a_loop_is_continued_past_the_end_of_the_text():
    # The latest match of the suffix [3, 4] ends one token before the text does; the rollout
    # continues through its own proposals, so the whole period repeats.
    ng = NgramProposer()
    assert ng.lookup([1, 2, 3, 4, 1, 2, 3, 4], 6) == [1, 2, 3, 4, 1, 2]
    assert ng.lookup([7] * 6, 4) == [7, 7, 7, 7]


def test_the_rollout_stops_where_acceptance_gets_unlikely():
    # Predicted from 4-token suffixes, tokens are accepted ~85% of the time; from 2-token ones,
    # ~45%: two of them (0.2) clear the 0.1 bar, three (0.09) do not.
    assert NgramProposer().lookup([7] * 6, 8) == [7] * 8
    assert NgramProposer().lookup([7, 7, 7], 8) == [7, 7]


def test_the_most_frequent_continuation_wins_and_ties_go_to_the_latest():
    ng = NgramProposer(min_n=2, max_n=2)
    assert ng.lookup([5, 6, 1, 5, 6, 1, 5, 6, 2, 5, 6], 1) == [1]  # 1 followed twice, 2 once
    assert ng.lookup([5, 6, 1, 5, 6, 2, 5, 6], 1) == [2]  # once each: the latest


def test_longer_suffixes_take_precedence():
    # After [9, 5, 6] came 3; after [5, 6] alone more often 1: the longer context decides.
    ng = NgramProposer(min_n=1, max_n=3)
    assert ng.lookup([5, 6, 1, 5, 6, 1, 9, 5, 6, 3, 0, 9, 5, 6], 1) == [3]


def test_one_token_suffixes_need_two_sightings():
    ng = NgramProposer(min_n=1, max_n=4)
    assert ng.lookup([4, 8, 1, 4], 3) == []  # 4 -> 8 seen once: too thin
    assert ng.lookup([4, 8, 1, 4, 8, 2, 4], 1) == [8]  # seen twice
    assert ng.lookup([1, 2, 3], 3) == []  # nothing ever repeats


def test_the_index_follows_a_sequence_and_starts_over_when_it_shrinks():
    ng = NgramProposer()
    toks = [1, 2, 3, 1, 2]
    assert ng.propose([seq(toks)], [2]) == [Proposal([3, 1])]
    toks += [3, 9, 1, 2, 3]  # the sequence grew: only the new tokens are indexed
    assert ng.model_for(seq(toks)).num_indexed == 5
    assert ng.propose([seq(toks)], [2]) == [Proposal([9, 1])]  # 1 2 3 -> 9 is the latest
    assert ng.model_for(seq(toks)).num_indexed == len(toks)
    assert ng.propose([seq([1, 2, 1, 2, 1])], [2]) == [Proposal([2, 1])]  # shorter: fresh index
    assert ng.model_for(seq([1, 2, 1, 2, 1])).num_indexed == 5
    ng.free(seq([]))
    assert not ng._models


class RecordingProposer(Proposer):
    """Proposes nothing; records the k asked for each sequence."""

    def __init__(self) -> None:
        self.asked: list[list[int]] = []

    def propose(self, seqs, ks):
        self.asked.append(list(ks))
        return [Proposal([]) for _ in seqs]


def test_k_is_cut_to_the_step_token_budget(model):
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=6, min_acceptance=0.0,
                             max_step_tokens=9)
    eng = make_engine(model, spec)
    eng.spec.proposer = rec = RecordingProposer()
    run(eng, max_tokens=8)  # 4 sequences: 9 // 4 - 1 = 1 each
    full = [ks for ks in rec.asked if len(ks) == 4]
    assert full and all(k == 1 for ks in full for k in ks)
    rec.asked.clear()
    run_to_completion(eng, [Request(request_id="one", prompt_token_ids=PROMPTS[0],
                                    sampling=greedy(8))])
    assert rec.asked and max(k for ks in rec.asked for k in ks) == 6  # 9 // 1 - 1 = 8, k = 6


def test_budget_resolves_to_the_fused_step_size_on_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = SpeculativeConfig(num_speculative_tokens=8)
    amx = cpu_linear.amx_available()
    assert resolve_max_step_tokens(cfg, cpu, torch.bfloat16).max_step_tokens == \
        (SPEC_STEP_TOKENS_AMX if amx else MAX_ROWS)
    assert resolve_max_step_tokens(cfg, cpu, torch.float32).max_step_tokens == MAX_ROWS
    assert resolve_max_step_tokens(cfg, cuda, torch.bfloat16).max_step_tokens == 8 * 9
    given = SpeculativeConfig(max_step_tokens=5)
    assert resolve_max_step_tokens(given, cpu, torch.bfloat16).max_step_tokens == 5
