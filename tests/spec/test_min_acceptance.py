"""min_acceptance left unset: n-gram and EAGLE proposals go ungated where the measured gate
judges the cost (the default) or a verify costs about a decode (bf16 on AMX, CUDA), and gated
at 0.3 elsewhere; a draft model stays gated; a value the user gives always stands."""

from __future__ import annotations

import torch

from kernels import cpu_linear
from worker.spec.config import GATED_MIN_ACCEPTANCE, SpeculativeConfig
from worker.spec.factory import resolve_min_acceptance

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _resolved(method: str, device: torch.device, dtype: torch.dtype, **kw) -> float | None:
    return resolve_min_acceptance(SpeculativeConfig(method=method, **kw), device,
                                  dtype).min_acceptance


def test_self_limiting_proposers_are_ungated_under_the_measured_gate() -> None:
    for method in ("ngram", "eagle"):
        for device, dtype in ((CPU, torch.bfloat16), (CPU, torch.float32),
                              (CUDA, torch.bfloat16)):
            assert _resolved(method, device, dtype) == 0.0


def test_without_the_gate_only_cheap_verifies_go_ungated() -> None:
    amx = cpu_linear.amx_available()
    off = {"measure_gate": False}
    assert _resolved("ngram", CPU, torch.bfloat16, **off) == \
        (0.0 if amx else GATED_MIN_ACCEPTANCE)
    assert _resolved("eagle", CPU, torch.float32, **off) == GATED_MIN_ACCEPTANCE
    assert _resolved("ngram", CUDA, torch.bfloat16, **off) == 0.0


def test_draft_models_stay_gated_and_explicit_values_stand() -> None:
    # A draft's proposals cost draft forwards, so low acceptance still stops them.
    assert _resolved("draft", CUDA, torch.bfloat16) == GATED_MIN_ACCEPTANCE
    assert _resolved("pool", CPU, torch.bfloat16) == GATED_MIN_ACCEPTANCE
    assert _resolved("ngram", CUDA, torch.bfloat16, min_acceptance=0.5) == 0.5
    assert _resolved("ngram", CPU, torch.float32, min_acceptance=0.0) == 0.0
