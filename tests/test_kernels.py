"""Decode kernels: the Triton kernel against its torch twin (CUDA only), the twin against eager attention."""

import pytest
import torch

from kvforge.attention.backends import eager
from kvforge.kernels.decode import (
    _plan,
    decode_attention,
    decode_attention_gather,
    decode_attention_ref,
    dense_segments,
)


def packed_case(lengths, b, h, g, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.int32)
    offs = torch.zeros(len(lengths), dtype=torch.int64)
    offs[1:] = torch.cumsum(lens[:-1].long() + 3, 0)  # segments with spare room between them
    n = int(offs[-1] + lens[-1]) + 3
    k = torch.randn(n, d, generator=gen).to(dtype)
    v = torch.randn(n, d, generator=gen).to(dtype)
    q = torch.randn(b, h * g, d, generator=gen).to(dtype)
    return [t.to(device) for t in (q, k, v, offs, lens)]


def pdl_graph_replays(src, k, v, offs, lens, replays: int = 3):
    """`decode_attention(pdl=True)` captured in a CUDA graph right after a kernel that writes its query (a copy
    of `src`) and before one that reads its output; yields the output after each replay, the query zeroed
    before each (so a kernel that read early would see zeros). Also used by benchmarks/gpu_attention.py."""
    q = torch.zeros_like(src)
    d = src.shape[-1]
    mx, tot = int(lens.max()), int(lens.sum())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q.copy_(src)
        decode_attention(q, k, v, offs, lens, d**-0.5, max_len=mx, total=tot, pdl=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q.copy_(src)
        out = decode_attention(q, k, v, offs, lens, d**-0.5, max_len=mx, total=tot, pdl=True).float() * 1.0
    for _ in range(replays):
        q.zero_()
        graph.replay()
        torch.cuda.synchronize()
        yield out


def test_twin_matches_eager_on_dense_and_ragged():
    b, h, g, d, n = 2, 3, 2, 16, 20
    kb, vb, q = torch.randn(b, h, n + 5, d), torch.randn(b, h, n + 5, d), torch.randn(b, h * g, d)
    k, offs, lens = dense_segments(kb, n)
    out = decode_attention(q, k, vb.view(-1, d), offs, lens, 0.25)  # CPU: dispatches to the twin
    ref = eager(q[:, :, None], kb[:, :, :n], vb[:, :, :n], None, scale=0.25)[:, :, 0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    lengths = [0, 1, 7, 19, 4, 11]  # ragged, including empty and single-entry heads
    q, k, v, offs, lens = packed_case(lengths, b, h, g, d)
    out = decode_attention_ref(q, k, v, offs, lens, 0.25)
    for r in range(b * h):
        bi, hi = divmod(r, h)
        o, ln = int(offs[r]), int(lens[r])
        want = torch.zeros(g, d) if ln == 0 else eager(
            q[bi : bi + 1, hi * g : (hi + 1) * g, None], k[None, None, o : o + ln], v[None, None, o : o + ln], None,
            scale=0.25)[0, :, 0]
        torch.testing.assert_close(out[bi, hi * g : (hi + 1) * g], want, rtol=1e-5, atol=1e-5)


def test_bad_split_is_rejected():
    q, k, v, offs, lens = packed_case([3, 2], 1, 2, 2, 16)
    with pytest.raises(ValueError, match="split=0: must be a positive number of keys per program"):
        decode_attention(q, k, v, offs, lens, 0.25, split=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_path_matches_twin_on_fresh_ragged_inputs(seed):
    """The vectorised torch path (CPU decode, traceable by torch.compile) equals the per-segment loop on fresh
    random ragged segments (lengths 0 and 1 included), batch > 1, with max_len larger than any segment."""
    gen = torch.Generator().manual_seed(100 + seed)
    b, h, g, d = 3, 2, 4, 16
    lengths = [0, 1] + torch.randint(0, 40, (b * h - 2,), generator=gen).tolist()
    q, k, v, offs, lens = packed_case(lengths, b, h, g, d, seed=seed)
    ref = decode_attention_ref(q, k, v, offs, lens, d**-0.5)
    out = decode_attention_gather(q, k, v, offs, lens, d**-0.5, max_len=int(lens.max()) + 5)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert out[0, :g].abs().max() == 0  # the empty segment gives zeros


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("block_n,split", [(64, None), (128, None), (128, 200)])
def test_triton_matches_twin(dtype, b, block_n, split):
    """Both tile sizes (the device default and the other), and splits that end mid-tile, on fresh inputs; a
    second call gives the same."""
    h, g, d = 8, 4, 128
    for seed in range(3):  # fresh random inputs each time, ragged lengths including 0 and 1
        lengths = torch.randint(0, 3000, (b * h,), generator=torch.Generator().manual_seed(seed)).tolist()
        lengths[0], lengths[-1] = 0, 1
        q, k, v, offs, lens = packed_case(lengths, b, h, g, d, dtype, "cuda", seed)
        out = decode_attention(q, k, v, offs, lens, d**-0.5, block_n=block_n, split=split)
        torch.testing.assert_close(decode_attention(q, k, v, offs, lens, d**-0.5, block_n=block_n, split=split),
                                   out)
        ref = decode_attention_ref(q.double(), k.double(), v.double(), offs, lens, d**-0.5)
        assert not torch.isnan(out).any()
        err = (out.double() - ref).norm() / ref.norm()
        assert err < 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_reads_only_the_partials_it_wrote():
    """Skewed heads, empty segments first, inside and last, and graph-mode bounds (longest and total with spare
    room): with unwritten memory filled with NaN (deterministic mode), any partial slot the merge read but no
    split program wrote would show as NaN."""
    h, g, d = 8, 4, 128
    lengths = [0, 9000, 0, 1, 300, 0, 2, 17, 0, 4500, 128, 129, 0, 0, 5, 0]
    q, k, v, offs, lens = packed_case(lengths, 2, h, g, d, torch.bfloat16, "cuda", 3)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), offs, lens, d**-0.5)
    torch.use_deterministic_algorithms(True)
    try:
        for slack in (0, 700):
            out = decode_attention(q, k, v, offs, lens, d**-0.5, max_len=max(lengths) + slack,
                                   total=sum(lengths) + slack * len(lengths))
            assert not out.isnan().any()
            assert (out.double() - ref).norm() / ref.norm() < 1e-2
            assert out[0, :g].abs().max() == 0  # the empty first segment gives zeros
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs CUDA compute capability >= 9")
def test_pdl_launch_waits_for_its_inputs_in_a_graph():
    """`pdl=True` captured between the kernel that writes the query and one that reads the output: every replay
    (query zeroed, then rewritten inside the graph) equals the twin, so neither kernel reads early."""
    h, g, d = 8, 4, 128
    lengths = torch.randint(0, 5000, (2 * h,), generator=torch.Generator().manual_seed(7)).tolist()
    lengths[0], lengths[-1] = 0, 1
    src, k, v, offs, lens = packed_case(lengths, 2, h, g, d, torch.bfloat16, "cuda", 7)
    ref = decode_attention_ref(src.double(), k.double(), v.double(), offs, lens, d**-0.5)
    for out in pdl_graph_replays(src, k, v, offs, lens):
        assert not out.isnan().any()
        assert (out.double() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiler_sees_the_kernels_write_only_their_outputs():
    """`torch.compile` reads which tensors a Triton kernel writes from its IR; where that analysis fails it takes
    every argument as written, the K/V cache included, and then copies or reorders around it. The split kernel
    writes only its partials, the merge only its output."""
    import torch._higher_order_ops.triton_kernel_wrap as wrap

    from kvforge.kernels.decode import _merge_kernel, _split_kernel

    q, k, v, offs, lens = packed_case([5, 0, 300, 17], 1, 4, 4, 128, torch.bfloat16, "cuda")
    _, _, block_n, ns, split, m, lse, acc, out = _plan(q, v, offs, lens, None, None, None, None, None, None)
    split_args = dict(Q=q, K=k, V=v, OFF=offs, LEN=lens, M=m, L=lse, ACC=acc, scale=0.1, split=split,
                      stride_qb=q.stride(0), stride_qh=q.stride(1), H=4, G=4, GP=16, D=128, DV=128, NS=ns,
                      BLOCK_N=block_n, PDL=False, IEEE=False)
    merge_args = dict(M=m, L=lse, ACC=acc, OUT=out, stride_ob=out.stride(0), stride_oh=out.stride(1), NS=ns, H=4,
                      G=4, DV=128, CH=64, PDL=False)
    for kernel, kwargs, written in ((_split_kernel, split_args, {"M", "L", "ACC"}),
                                    (_merge_kernel, merge_args, {"OUT"})):
        if hasattr(wrap, "identify_mutated_tensors"):  # torch <= 2.12
            found = set(wrap.identify_mutated_tensors(kernel, kwargs, {}))
        else:
            found = {d.name for d in wrap.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes}
        assert found == written, (kernel.fn.__name__, found)
