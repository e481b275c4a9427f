"""The window attention's column sums (SnapKV, TOVA, NaCl, merging): the fused Triton kernels against their
float32 twin (CUDA only), the twin against the layer context's own masked softmax."""

import pytest
import torch
from test_presses_prefill import make_ctx

from kvforge.kernels.window_scores import can_fuse, window_colsum, window_colsum_ref

CASES = [  # (batch, query heads, KV heads, queries, entries, head dim, window)
    (1, 8, 2, 24, 24, 32, 8),
    (2, 4, 4, 40, 40, 64, 1),  # TOVA's window: the last query alone
    (1, 8, 2, 16, 16, 16, 64),  # a window longer than the queries
    (2, 8, 1, 17, 300, 128, 32),  # a chunk's queries over more stored entries (chunked prefill)
    (1, 6, 2, 70, 70, 80, 64),  # head dim and window not powers of two
    (1, 32, 8, 64, 4096, 128, 64),  # Llama-3.1-8B heads, the entries in several splits
]


def case(b, hq, h, q, n, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    query = (torch.randn(b, q, hq, d, generator=g) * 2).to(dtype).transpose(1, 2)  # strided like a projection
    keys = (torch.randn(b, h, n, d, generator=g) * 2).to(dtype)
    return query.to(device), keys.to(device)


@pytest.mark.parametrize("shape", CASES)
def test_reference_equals_the_context_window_attention_summed(shape):
    """The twin's bottom-right causal mask is the one a plain prefill's context applies: the same sums."""
    b, hq, h, q, n, d, w = shape
    if q != n:
        pytest.skip("the layer context holds the queries' own entries only")
    query, keys = case(b, hq, h, q, n, d, torch.float32)
    ctx = make_ctx(query, keys)
    want = ctx.window_attention_reference(w).sum(3)
    got = window_colsum_ref(query, keys, w, d**-0.5)
    assert got.shape == (b, h, hq // h, n)
    assert (got - want).abs().max() <= 1e-5
    assert torch.allclose(got.sum(-1), torch.full((), float(min(w, q))), atol=1e-4)  # each query's row sums to 1
    assert torch.equal(ctx.window_attention_sum(w), ctx.window_attention(w).sum(3))  # CPU: the torch form


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2e-5), (torch.bfloat16, 2e-4), (torch.float16, 2e-4)])
def test_kernel_matches_the_float32_twin(shape, dtype, bound):
    """The Triton kernels keep the logits in float32, so on fresh random inputs they stay within float32 rounding of
    the twin evaluated on the same (rounded) inputs, relative to the window length; NaN never passes."""
    b, hq, h, q, n, d, w = shape
    for seed in range(3):
        query, keys = case(b, hq, h, q, n, d, dtype, "cuda", seed)
        assert can_fuse(query, keys)
        got = window_colsum(query, keys, w, d**-0.5)
        want = window_colsum_ref(query, keys, w, d**-0.5)
        assert not got.isnan().any() and got.dtype == torch.float32
        err = (got - want).abs().max() / min(w, q)
        assert err <= bound, (seed, err)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_context_uses_the_kernel_in_a_plain_prefill_only():
    """On CUDA a plain prefill's context sums with the kernels (close to the float32 twin); a padded one keeps the
    masked torch form, padding getting nothing."""
    query, keys = case(2, 8, 2, 64, 64, 64, torch.bfloat16, "cuda")
    ctx = make_ctx(query, keys)
    fused = ctx.window_attention_sum(16)
    assert (fused - ctx.window_attention_reference(16).sum(3)).abs().max() <= 2e-3
    real = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    real[1, :9] = False
    padded = make_ctx(query, keys, key_real=real)
    sums = padded.window_attention_sum(16)
    assert torch.equal(sums, padded.window_attention(16).sum(3))
    assert bool((sums[1, ..., :9] == 0).all())
