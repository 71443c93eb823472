"""`prefill_attention`: a prompt's causal attention on the GEMM micro-kernels.

Checked against a float64 softmax attention written out position by position, at shapes that
exercise each edge of the work items (a last block of 16 positions, prompts padded to 16, a
prompt after earlier positions in the cache, head sizes of 8 to 64, groups of 1 to 4 query heads
per KV head, more items than threads and fewer), on one thread and on several. The cache past
the filled positions holds NaN, so any read of it shows. The seed of the random inputs is in
each failure message (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from workbench.backends import prefill_attention


def reference(qt: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """float64 causal attention: qt (heads*hd, n), k, v (kv_heads, ctx, hd) -> (heads*hd, n)."""
    n_kv, _, hd = k.shape
    heads, n = qt.shape[0] // hd, qt.shape[1]
    out = np.empty((heads * hd, n))
    for h in range(heads):
        q = qt[h * hd : (h + 1) * hd].T.astype(np.float64)  # (n, hd)
        kk, vv = k[h // (heads // n_kv)].astype(np.float64), v[h // (heads // n_kv)]
        for i in range(n):
            t = start + i + 1  # the keys position start + i sees
            s = kk[:t] @ q[i] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[h * hd : (h + 1) * hd, i] = p @ vv[:t] / p.sum()
    return out


@pytest.mark.parametrize(
    ("heads", "kv_heads", "hd", "n", "start"),
    [
        (9, 3, 64, 128, 0),  # SmolLM2's prompt: whole blocks of 32
        (9, 3, 64, 48, 0),  # a last block of 16
        (4, 4, 32, 37, 5),  # padded to 48, after 5 cached positions
        (8, 2, 16, 1, 0),  # one position
        (2, 1, 8, 70, 100),  # a long cache before a short head
        (3, 3, 64, 16, 200),  # 3 items on 2 threads
    ],
)
def test_attention_cols_is_causal_softmax_attention(
    heads: int, kv_heads: int, hd: int, n: int, start: int, numba_threads: int, rng, seed: int
) -> None:
    ctx = start + n + 9  # room past the prompt, filled with NaN
    qt = rng.standard_normal((heads * hd, n)).astype(np.float32)  # (heads*hd, n)
    k, v = (rng.standard_normal((kv_heads, ctx, hd)).astype(np.float32) for _ in range(2))
    k[:, start + n :], v[:, start + n :] = np.nan, np.nan
    got = prefill_attention.attention_cols(qt, k, v, start)
    assert got.shape == (heads * hd, n) and got.dtype == np.float32 and got.flags.c_contiguous
    want = reference(qt, k, v, start)
    # Each output is a convex combination of values of about 1: float32 sums of up to 300 terms
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6, err_msg=f"{numba_threads=} {seed=}")


def test_attention_cols_takes_a_view_of_q(rng, seed: int) -> None:
    """A query that is a slice of a bigger array: the same result as its copy."""
    k, v = (rng.standard_normal((2, 40, 16)).astype(np.float32) for _ in range(2))
    big = rng.standard_normal((64, 60)).astype(np.float32)
    view = big[:, 10:42]  # (4 heads * 16, 32), columns not contiguous
    want = prefill_attention.attention_cols(np.ascontiguousarray(view), k, v, 3)
    np.testing.assert_array_equal(prefill_attention.attention_cols(view, k, v, 3), want, f"{seed=}")


@pytest.mark.parametrize(
    ("q_shape", "cache", "start", "message"),
    [
        ((6 * 8, 4), (4, 16, 8), 0, "attention of q"),  # 6 heads over 4 KV heads
        ((4 * 8, 10), (2, 16, 8), 8, "attention of q"),  # past the cache's end
        ((2 * 6, 4), (1, 16, 6), 0, "head size 6"),
    ],
)
def test_attention_cols_rejects_shapes_that_do_not_fit(q_shape, cache, start, message) -> None:
    k = np.zeros(cache, np.float32)
    with pytest.raises(ValueError, match=message):
        prefill_attention.attention_cols(np.zeros(q_shape, np.float32), k, k, start)
