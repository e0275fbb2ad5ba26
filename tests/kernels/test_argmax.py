"""kernels.argmax against torch.argmax: ties, NaN, infinities, odd widths, strided rows."""

from __future__ import annotations

import pytest
import torch

from kernels.argmax import argmax_rows, argmax_rows_reference


@pytest.mark.parametrize(("rows", "n"), [(1, 1), (1, 15), (3, 16), (5, 37), (64, 49152),
                                         (7, 1000)])
def test_matches_torch_on_random_rows(rows: int, n: int) -> None:
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    assert torch.equal(argmax_rows(x), argmax_rows_reference(x))


def test_ties_nan_and_infinities_answer_as_torch_does() -> None:
    x = torch.zeros(6, 50)
    x[0, [3, 17, 40]] = 2.0                      # ties: the first
    x[1, 45] = float("nan")                      # NaN in the scalar tail
    x[1, 2] = 5.0
    x[2, [5, 30]] = float("nan")                 # NaN in the vector part: the first NaN
    x[3, :] = float("-inf")                      # all -inf: index 0
    x[4, 33] = float("inf")
    x[5, 49] = 1.0                               # maximum in the tail only
    assert torch.equal(argmax_rows(x), argmax_rows_reference(x))
    assert argmax_rows(x).tolist() == [3, 45, 5, 0, 33, 49]


def test_strided_rows_and_fallbacks() -> None:
    wide = torch.randn(4, 80)
    x = wide[:, :64]  # rows not contiguous with each other
    assert torch.equal(argmax_rows(x), argmax_rows_reference(x))
    assert torch.equal(argmax_rows(x.bfloat16()), argmax_rows_reference(x.bfloat16()))
    assert torch.equal(argmax_rows(x.t()), argmax_rows_reference(x.t()))
