"""The decode kernels (split + merge) run on the CPU through Triton's interpreter, against the float64 twin.

    pip install --target /tmp/tri triton==3.6.0 numpy==2.2.6   # the interpreter's range() needs numpy < 2.3
    PYTHONPATH=/tmp/tri:src python benchmarks/interpret_decode.py

Checks the arithmetic of the Triton code without a GPU (tests/test_kernels.py runs it on one; programmatic
dependent launch, `pdl=True`, only runs there). Exits 1 on a failure.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402
from test_kernels import packed_case  # noqa: E402

from kvforge.kernels.decode import decode_attention, decode_attention_ref  # noqa: E402


def main() -> int:
    ok = True
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        b, h, g, d = 2, 2, (3 if seed == 2 else 4), 32  # G = 3: a group size that is not a power of 2
        lengths = [0, 1] + torch.randint(0, 300, (b * h - 2,), generator=gen).tolist()
        q, k, v, offs, lens = packed_case(lengths, b, h, g, d, dtype=torch.float16, seed=seed)
        ref = decode_attention_ref(q.double(), k.double(), v.double(), offs, lens, d**-0.5).float()
        # 40: splits that end mid-tile; 3: > 64 splits (two merge passes); 64 SMs: one split per segment
        for block_n, split, sms in ((16, None, 2), (32, None, 2), (16, 40, 2), (16, 3, 2), (16, None, 64)):
            out = decode_attention(q, k, v, offs, lens, d**-0.5, sms=sms, block_n=block_n, waves=2,
                                   split=split).float()
            err = ((out - ref).norm() / ref.norm()).item()
            ok &= err < 1e-2 and not out.isnan().any()
            print(f"seed {seed} block {block_n} split {split} SMs {sms}: relative error {err:.2e}")
    # skewed heads, empty segments first / inside / last, graph-mode bounds; unwritten memory is NaN
    # (deterministic mode), so a partial slot the merge read but no split program wrote would show
    torch.use_deterministic_algorithms(True)
    lengths = [0, 900, 0, 1, 30, 0, 2, 17, 0, 450, 16, 17, 0, 0, 5, 0]
    q, k, v, offs, lens = packed_case(lengths, 2, 8, 4, 32, dtype=torch.float16, seed=4)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), offs, lens, 32**-0.5).float()
    for slack, sms in ((0, 2), (70, 2), (70, 40)):
        out = decode_attention(q, k, v, offs, lens, 32**-0.5, max_len=max(lengths) + slack,
                               total=sum(lengths) + slack * len(lengths), sms=sms, block_n=16, waves=2).float()
        err = ((out - ref).norm() / ref.norm()).item()
        ok &= err < 1e-2 and not out.isnan().any() and out[0, :4].abs().max().item() == 0
        print(f"skewed, slack {slack} SMs {sms}: relative error {err:.2e}")
    torch.use_deterministic_algorithms(False)
    try:  # no programmatic dependent launch off a Hopper-class GPU: a clear error, not a launch failure
        decode_attention(q, k, v, offs, lens, d**-0.5, sms=2, pdl=True)
        ok = False
    except ValueError as e:
        print("pdl=True on the interpreter:", e)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
