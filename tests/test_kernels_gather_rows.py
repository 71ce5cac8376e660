"""Row gathers and the inverse index (kernels/gather_rows.py) against their references, gradients included,
duplicate ids too.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernel_helpers import (
    DEVICE,
    GPU_DTYPES,
    RTOL,
    assert_close,
    distinct_ids,
    gpu,
    grads,
    requires_kernels,
)
from kernels import reference as ref
from kernels.gather_rows import inverse_index

pytestmark = requires_kernels



@pytest.mark.parametrize("B,L,D,n", [(3, 10, 24, 7), (4, 50, 32, 49), (2, 196, 40, 17)])
def test_gather_rows(B, L, D, n):
    table = torch.randn(L, D, device=DEVICE, requires_grad=True)
    ids = distinct_ids(B, L, n)
    out = kernels.gather_rows(table, ids)
    expected = ref.gather_rows_reference(table, ids)
    assert_close(out, expected, 0, "out")
    dout = torch.randn_like(out)
    assert_close(grads(out, (table,), dout)[0], grads(expected, (table,), dout)[0], 1e-4, "dtable")


def test_gather_rows_strided_table_and_int32_ids():
    L, D = 12, 40
    table_t = torch.randn(D, L, device=DEVICE, requires_grad=True)  # e.g. a parameter stored transposed
    table = table_t.t()
    ids = distinct_ids(2, L, 5).to(torch.int32)
    out = kernels.gather_rows(table, ids)
    expected = ref.gather_rows_reference(table, ids.long())
    assert out.is_contiguous()
    assert_close(out, expected, 0, "out")
    dout = torch.randn_like(out)
    assert_close(grads(out, (table_t,), dout)[0], grads(expected, (table_t,), dout)[0], 1e-6, "dtable")


def test_gather_rows_duplicate_ids_scatter_add_gradient():
    """Duplicate ids (not produced by masking, but legal) give the exact scatter-add gradient."""
    B, L, n = 3, 6, 20
    table = torch.randn(L, 24, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, L, (B, n), device=DEVICE)
    rows = kernels.gather_rows(table, ids)
    assert_close(rows, ref.gather_rows_reference(table, ids), 0, "rows")
    drows = torch.randn_like(rows)
    assert_close(grads(rows, (table,), drows)[0], grads(ref.gather_rows_reference(table, ids), (table,), drows)[0],
                 1e-4, "dtable")


def test_inverse_index_last_occurrence_and_counts():
    ids = torch.tensor([[3, 0, 3, 5, 3], [1, 1, 4, 2, 0]], device=DEVICE)
    inv, cnt = inverse_index(ids, 7)
    assert inv.dtype == cnt.dtype == torch.int32
    assert inv.tolist() == [[1, -1, -1, 4, -1, 3, -1], [4, 1, 3, -1, 2, -1, -1]]
    assert cnt.tolist() == [[1, 0, 0, 3, 0, 1, 0], [1, 2, 1, 0, 1, 0, 0]]


def test_gather_rows_rejects_bad_inputs():
    table = torch.randn(10, 8, device=DEVICE)
    with pytest.raises(ValueError, match="ids"):
        kernels.gather_rows(table, torch.zeros(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"table must be \(L, D\)"):
        kernels.gather_rows(table[None], distinct_ids(2, 10, 3))


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gather_rows_gpu(dtype):
    B, L = 16, 196
    ids = distinct_ids(B, L, 49)
    table = torch.randn(L, 512, device=DEVICE, dtype=dtype, requires_grad=True)
    rows = kernels.gather_rows(table, ids)
    assert_close(rows, ref.gather_rows_reference(table, ids), 0, "rows")
    drows = torch.randn_like(rows)
    assert_close(grads(rows, (table,), drows)[0],
                 grads(ref.gather_rows_reference(table.float(), ids), (table,), drows.float())[0].to(dtype),
                 RTOL[dtype], "dtable")
