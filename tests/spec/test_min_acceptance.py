"""min_acceptance left unset: n-gram proposals go ungated where a verify costs about a decode
(bf16 on AMX, CUDA) and gated at 0.3 elsewhere; a value the user gives always stands."""

from __future__ import annotations

import torch

from kernels import cpu_linear
from worker.spec.config import GATED_MIN_ACCEPTANCE, SpeculativeConfig
from worker.spec.factory import resolve_min_acceptance

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _resolved(method: str, device: torch.device, dtype: torch.dtype, **kw) -> float | None:
    return resolve_min_acceptance(SpeculativeConfig(method=method, **kw), device,
                                  dtype).min_acceptance


def test_ngram_is_ungated_where_verifying_is_cheap() -> None:
    amx = cpu_linear.amx_available()
    assert _resolved("ngram", CPU, torch.bfloat16) == (0.0 if amx else GATED_MIN_ACCEPTANCE)
    assert _resolved("ngram", CPU, torch.float32) == GATED_MIN_ACCEPTANCE
    assert _resolved("ngram", CUDA, torch.bfloat16) == 0.0


def test_draft_models_stay_gated_and_explicit_values_stand() -> None:
    # A draft's proposals cost draft forwards, so low acceptance still stops them.
    assert _resolved("draft", CUDA, torch.bfloat16) == GATED_MIN_ACCEPTANCE
    assert _resolved("ngram", CUDA, torch.bfloat16, min_acceptance=0.5) == 0.5
    assert _resolved("ngram", CPU, torch.float32, min_acceptance=0.0) == 0.0
