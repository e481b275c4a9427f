"""The decode kernels (both merges) run on the CPU through Triton's interpreter, against the float64 twin.

    pip install --target /tmp/tri triton==3.6.0 numpy==2.2.6   # the interpreter's range() needs numpy < 2.3
    PYTHONPATH=/tmp/tri:src python benchmarks/interpret_decode.py

Programs run one after another here, so this checks the arithmetic and the counter reset of the fused merge,
not its memory ordering (tests/test_kernels.py checks that on a GPU). Exits 1 on a failure.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402
from test_kernels import packed_case  # noqa: E402

from kvforge.kernels.decode import _COUNTERS, decode_attention, decode_attention_ref  # noqa: E402


def main() -> int:
    ok = True
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        b, h, g, d = 2, 2, 4, 32
        lengths = [0, 1] + torch.randint(0, 300, (b * h - 2,), generator=gen).tolist()
        q, k, v, offs, lens = packed_case(lengths, b, h, g, d, dtype=torch.float16, seed=seed)
        ref = decode_attention_ref(q.double(), k.double(), v.double(), offs, lens, d**-0.5).float()
        for merge in ("separate", "fused"):
            for rep in range(2):  # a second call needs the counters back at zero
                out = decode_attention(q, k, v, offs, lens, d**-0.5, merge=merge, sms=2, block_n=16,
                                       waves=2).float()
                err = ((out - ref).norm() / ref.norm()).item()
                ok &= err < 1e-2 and not out.isnan().any()
                print(f"seed {seed} {merge:8} call {rep}: relative error {err:.2e}")
    counters_zero = all(int(c.abs().sum()) == 0 for c in _COUNTERS.values())
    print("counters back at zero:", counters_zero)
    return 0 if ok and counters_zero else 1


if __name__ == "__main__":
    sys.exit(main())
