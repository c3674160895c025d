from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.kv.pool import HUGE_PAGE, OutOfPagesError, PagePool, zeros_huge

ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 12)),
        st.tuples(st.just("free"), st.integers(0, 1000)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(num_pages=st.integers(1, 40), ops=ops)
def test_page_pool_matches_naive_model_and_never_leaks(num_pages, ops):
    pool = PagePool(num_pages)
    held: list[list[int]] = []  # the naive model: which allocations are outstanding
    for op, arg in ops:
        if op == "alloc":
            outstanding = sum(len(h) for h in held)
            if arg > num_pages - outstanding:
                with pytest.raises(OutOfPagesError):
                    pool.alloc(arg)
            else:
                pages = pool.alloc(arg)
                assert len(pages) == arg
                taken = {p for h in held for p in h}
                assert not taken & set(pages), "a page was handed out twice"
                assert all(0 <= p < num_pages for p in pages)
                held.append(pages)
        elif held:
            pool.free(held.pop(arg % len(held)))
        assert pool.num_free == num_pages - sum(len(h) for h in held)
    for h in held:
        pool.free(h)
    assert pool.num_free == num_pages
    assert sorted(pool.alloc(num_pages)) == list(range(num_pages))


def test_double_free_and_foreign_pages_are_rejected():
    pool = PagePool(4)
    pages = pool.alloc(2)
    pool.free(pages)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(pages[:1])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([17])
    assert pool.num_free == 4


def test_a_cpu_pool_on_huge_pages_is_an_ordinary_zeroed_tensor():
    """zeros_huge (the CPU pool's memory) below and above its huge-page threshold: zeroed,
    contiguous, of the shape and dtype asked, and writable everywhere."""
    for shape in ((3, 5), (5, HUGE_PAGE // 2 + 7)):  # 30 B; ~10 MB of bfloat16
        t = zeros_huge(shape, torch.bfloat16)
        assert t.shape == shape and t.dtype == torch.bfloat16 and t.is_contiguous()
        assert not t.any()
        t.fill_(1.5)
        assert float(t.float().sum()) == 1.5 * t.numel()
