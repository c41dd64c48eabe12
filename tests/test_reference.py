"""``reference.py``: the pure-torch kernels that every other kernel is compared with, and the outlier rule."""

from __future__ import annotations

import torch

from helpers import linear_case
from llm_int8 import reference
from llm_int8 import functional as F


def test_outlier_columns_are_a_property_of_the_batch():
    """One large value in one row takes its whole column out of the int8 product for every row."""
    x, weight, weight_int8, weight_absmax, _ = linear_case(torch.float32, 6, 32, 8, 6.0, 0)
    x[2, 5] = 50.0
    cols, *_ = reference.decomposed_columns(x, weight_int8, weight_absmax, 6.0, None, None)
    assert cols.tolist() == [5]
    out = F.int8_mixed_linear(x, weight_int8, weight_absmax, None, 6.0)
    out_row = F.int8_mixed_linear(x[:1], weight_int8, weight_absmax, None, 6.0)  # no outlier in row 0 alone
    assert not torch.equal(out[:1], out_row)


def test_the_outlier_rule():
    """|x| >= threshold is an outlier, the threshold itself included; NaN never is, +-Inf always is."""
    x = torch.tensor([[1.0, float("nan"), 6.0, -5.9], [-float("inf"), 2.0, -6.0, 0.0]])
    assert reference.outlier_values(x, 6.0).tolist() == [[False, False, True, False], [True, False, True, False]]
    assert reference.outlier_column_mask(x, 6.0).tolist() == [True, False, True, False]
    assert reference.outlier_columns(x, 6.0).tolist() == [0, 2]
    assert reference.outlier_columns(x, 7.0).tolist() == [0]  # Inf only
    # along another dim, keeping it: per row of x here (what calibration asks per window)
    assert reference.outlier_column_mask(x, 6.0, dim=1, keepdim=True).tolist() == [[True], [True]]
    # no rows: no outlier columns, of the right length
    assert reference.outlier_column_mask(x[:0], 6.0).tolist() == [False] * 4
    assert reference.outlier_columns(x[:0], 6.0).dtype == torch.int64


def test_a_nan_does_not_hide_an_outlier_in_its_column():
    x = torch.tensor([[float("nan")], [9.0], [float("nan")]])
    assert reference.outlier_columns(x, 6.0).tolist() == [0]


def test_vectorwise_quant_leaves_outlier_values_out_of_the_row_absmax():
    """int8_vectorwise_quant: outlier values leave their row's absmax, outlier columns are coded 0, and
    the codes are round(x * 127 / absmax) elsewhere."""
    x = torch.tensor([[1.0, 8.0, -2.0], [0.5, 1.0, 4.0]])
    codes, absmax, cols = reference.int8_vectorwise_quant(x, 6.0)
    assert cols.tolist() == [1]
    assert absmax.tolist() == [2.0, 4.0]  # 8.0 is left out of row 0's absmax
    assert codes.tolist() == [[64, 0, -127], [16, 0, 127]]  # 1 * 127 / 2 = 63.5 rounds half to even
