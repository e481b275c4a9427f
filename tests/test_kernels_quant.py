"""Fused quantized decode attention (`kvforge.kernels.quant_decode`): the torch twin against an independent
dequantize-and-attend loop and full precision (CPU), the Triton kernel against the twin (CUDA only)."""

import pytest
import torch

from kvforge.kernels.quant_decode import _quant_decode_triton, quant_decode_attention, quant_decode_attention_ref
from kvforge.kernels.quantize import quantize_keys, quantize_values, value_group

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_case(b, h, g, d, m, cap, bits, group, dtype=torch.float32, device="cpu", seed=0, dv=None):
    """Random keys/values (keys with a per-channel offset, as real keys have), quantized; a random tail."""
    dv = dv or d
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, m, d, generator=gen) + 2 * torch.randn(1, h, 1, d, generator=gen)
    vals = torch.randn(b, h, m, dv, generator=gen)
    tail_k = torch.randn(b, h, cap, d, generator=gen)
    tail_v = torch.randn(b, h, cap, dv, generator=gen)
    q = torch.randn(b, h * g, d, generator=gen)
    keys, vals, tail_k, tail_v, q = (t.to(dtype).to(device) for t in (keys, vals, tail_k, tail_v, q))
    parts = quantize_keys(keys, bits, group) + quantize_values(vals, bits, group)
    return q, parts, tail_k, tail_v, keys, vals


def loop_dequant(parts, bits, group):
    """Straightforward dequantization from the documented layout, element by element along the channel axis."""
    kq, ks, kz, vq, vs, vz = parts
    per, mask = 8 // bits, 2**bits - 1

    def codes(packed, n):
        nb = packed.shape[-1]
        out = torch.empty(*packed.shape[:3], n, dtype=torch.float32)
        for i in range(n):
            out[..., i] = ((packed[..., i % nb].to(torch.int32) >> ((i // nb) * bits)) & mask).float()  # bit-planes
        return out

    d, dv = kq.shape[-1] * per, vq.shape[-1] * per
    kc, vc = codes(kq, d), codes(vq, dv)
    keys = torch.empty_like(kc)
    for t in range(kc.shape[2]):  # keys: per channel, token groups of `group`
        keys[:, :, t] = kc[:, :, t] * ks[:, :, t // group].float() + kz[:, :, t // group].float()
    gv = value_group(dv, group)
    vals = torch.empty_like(vc)
    for c in range(dv):  # values: per token, channel groups of gv
        vals[..., c] = vc[..., c] * vs[..., c // gv].float() + vz[..., c // gv].float()
    return keys.to(ks.dtype), vals.to(vs.dtype)


def loop_attention(q, keys, vals, scale):
    """softmax(q·kᵀ·scale)·v per (row, query head), query head i reading KV head i // G."""
    b, hq, _ = q.shape
    g = hq // keys.shape[1]
    out = torch.empty(b, hq, vals.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for i in range(hq):
            k, v = keys[bi, i // g].double(), vals[bi, i // g].double()
            p = torch.softmax(k @ q[bi, i].double() * scale, 0)
            out[bi, i] = p @ v
    return out


def rel(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("bits,group,g,d,m,n_tail", [(2, 32, 4, 16, 64, 5), (4, 8, 1, 16, 24, 0), (8, 16, 8, 8, 32, 3),
                                                     (4, 32, 2, 16, 0, 7), (2, 3, 2, 16, 9, 2)])
def test_ref_equals_loop_over_dequantized(bits, group, g, d, m, n_tail):
    b, h, cap, scale = 2, 2, 8, 0.3
    q, parts, tk, tv, _, _ = make_case(b, h, g, d, m, cap, bits, group, seed=m + bits)
    keys, vals = loop_dequant(parts, bits, group)
    keys = torch.cat([keys, tk[:, :, :n_tail]], 2)
    vals = torch.cat([vals, tv[:, :, :n_tail]], 2)
    want = loop_attention(q, keys, vals, scale)
    tk[:, :, n_tail:], tv[:, :, n_tail:] = float("nan"), float("nan")  # spare tail slots hold anything
    for tail_len in (n_tail, torch.tensor([n_tail])):  # a device length (graph mode) masks instead of slicing
        out = quant_decode_attention_ref(q, parts, bits, group, tk, tv, tail_len, scale)
        assert out.shape == (b, h * g, d) and out.dtype == q.dtype
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # on CPU the public function is the twin
    torch.testing.assert_close(quant_decode_attention(q, parts, bits, group, tk, tv, n_tail, scale), out)


def test_ref_8bit_close_to_full_precision():
    b, h, g, d, m, cap, n_tail = 2, 2, 4, 64, 256, 32, 19
    q, parts, tk, tv, keys, vals = make_case(b, h, g, d, m, cap, 8, 32, seed=3)
    out = quant_decode_attention_ref(q, parts, 8, 32, tk, tv, n_tail, d**-0.5)
    full = loop_attention(q, torch.cat([keys, tk[:, :, :n_tail]], 2), torch.cat([vals, tv[:, :, :n_tail]], 2),
                          d**-0.5)
    assert torch.isfinite(out).all()
    assert rel(out, full) < 1e-2


# --- CUDA: the Triton kernel against the twin ---------------------------------------------------------------

def check_triton(b, h, g, d, m, cap, n_tail, bits, group, dtype, seed, device_len=False, dv=None, **kw):
    """The Triton kernel (keyword arguments: the public tuning ones, or the internal `asm` / `sms`) vs the twin."""
    q, parts, tk, tv, _, _ = make_case(b, h, g, d, m, cap, bits, group, dtype, "cuda", seed, dv)
    tail_len = torch.tensor([n_tail], device="cuda", dtype=torch.int32) if device_len else n_tail
    fn = _quant_decode_triton if {"asm", "sms"} & kw.keys() else quant_decode_attention
    out = fn(q, parts, bits, group, tk, tv, tail_len, d**-0.5, **kw)
    ref = quant_decode_attention_ref(q.double(), parts, bits, group, tk, tv, n_tail, d**-0.5)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = rel(out, ref)
    assert err < 1e-2, err


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_matches_ref(dtype, bits):
    gen = torch.Generator().manual_seed(bits)
    for seed, (b, group, device_len) in enumerate([(1, 128, True), (3, 128, False), (3, 32, True), (1, 32, True)]):
        m = group * int(torch.randint(1, 40, (1,), generator=gen))  # fresh random inputs and lengths each time
        n_tail = int(torch.randint(0, 200, (1,), generator=gen))
        check_triton(b, 8, 4, 128, m, 200, n_tail, bits, group, dtype, seed, device_len=device_len)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("g,d,dtype", [(1, 128, torch.bfloat16), (8, 128, torch.float16), (4, 64, torch.float16),
                                       (8, 64, torch.bfloat16)])
def test_triton_ragged(g, d, dtype):
    for seed, (b, m, n_tail) in enumerate([(2, 0, 37), (1, 0, 1), (1, 384, 0), (3, 256, 0), (3, 4096, 96)]):
        check_triton(b, 4, g, d, m, 96, n_tail, 4, 128, dtype, seed, device_len=True)  # m 0, tail 0, full
    check_triton(3, 4, g, d, 256, 96, 0, 2, 32, dtype, 9)  # host int length


VARIANTS = [(2, 48, {}), (4, 3, {}), (4, 8, {}), (2, 16, {}), (4, 256, {}), (4, 32, {}), (8, 64, {}),
            (2, 128, dict(block_n=64)), (4, 128, dict(num_warps=8)), (2, 32, dict(num_warps=8)),
            (4, 128, dict(num_stages=1)), (2, 128, dict(num_stages=3)), (2, 128, dict(block_n=256)),
            (4, 32, dict(block_n=64)), (2, 128, dict(asm=False)), (8, 32, dict(asm=False))]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("bits,group,kw", VARIANTS)
def test_triton_variants(bits, group, kw):
    """The other code paths and tunings: key groups that are not powers of two or under 16 (dequantized per
    element), value groups under 16 channels (dequantized), groups larger than a block, value groups narrower than
    a plane, key groups stacked in a block, smaller and larger blocks, 8 warps, pipelining depths, the
    pure-Triton unpacking."""
    for seed, dtype in enumerate((torch.bfloat16, torch.float16)):
        check_triton(2, 8, 4, 128, group * 20, 64, 33, bits, group, dtype, seed + bits, device_len=True, **kw)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("bits,group", [(2, 128), (4, 32)])
def test_triton_one_long_split(bits, group):
    """One program per (row, head) asked for over 32k coded entries: shares are capped at MAX_SPLIT entries (past
    that the error grew to 2.5e-2 here, see quant_decode.MAX_SPLIT), so this checks the cap's precision."""
    check_triton(1, 2, 4, 128, 32768, 64, 40, bits, group, torch.bfloat16, 3, device_len=True, sms=1, waves=1)


@pytest.mark.cuda
@cuda
def test_triton_small_planes():
    check_triton(2, 4, 4, 64, 20 * 32, 64, 5, 2, 32, torch.bfloat16, 99)  # D = 64 at 2 bits: 16-byte planes


@pytest.mark.cuda
@cuda
def test_cuda_graph_capture_with_device_tail_len():
    b, h, g, d, m, cap, bits, group = 1, 8, 4, 128, 2048, 128, 4, 128
    q, parts, tk, tv, _, _ = make_case(b, h, g, d, m, cap, bits, group, torch.bfloat16, "cuda", 7)
    tail_len = torch.tensor([50], device="cuda", dtype=torch.int32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compile and warm up outside the capture
        quant_decode_attention(q, parts, bits, group, tk, tv, tail_len, d**-0.5)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_decode_attention(q, parts, bits, group, tk, tv, tail_len, d**-0.5)
    for n_tail in (51, 128, 0):
        tail_len.fill_(n_tail)
        graph.replay()
        torch.cuda.synchronize()
        ref = quant_decode_attention_ref(q.double(), parts, bits, group, tk, tv, n_tail, d**-0.5)
        assert torch.isfinite(out).all()
        assert rel(out, ref) < 1e-2
