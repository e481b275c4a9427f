"""The peer: NVIDIA kvpress 0.5.5 decode speed and memory on a GPU, on the shapes `kvforge bench` uses.

Random-weight Llama-3.1-8B (bf16, SDPA, transformers' `DynamicCache`), batch 1: prefill a random context with a
press active (kvpress's forward hooks), then decode 32 tokens outside the press (3 untimed first) and time
ms/token; report the KV entries kept in layer 0 and the peak memory of the whole run. Weight values change
neither speed nor memory, so random weights are a fair comparison.

kvpress needs transformers < 5.3, so it runs in its own environment, never next to kvforge:

    python -m venv /tmp/peer && /tmp/peer/bin/pip install kvpress==0.5.5 transformers==5.2.0
    OUT=runs /tmp/peer/bin/python benchmarks/kvpress_speed.py      # LENGTHS=32768,131072 by default
    PRESSES=none,knorm_0.75 LENGTHS=131072 OUT=runs /tmp/peer/bin/python benchmarks/kvpress_speed.py

Writes `$OUT/kvpress_speed.json` (`OUT` defaults to the current directory). Run it on the same machine right
after the `kvforge bench` run it is compared with, so that the ratio is between two runs of one machine.
"""

import json
import os
import sys
import time
import types

import torch

for _name in ("datasets", "fire"):  # imported at module level by two kvpress presses not used here
    try:
        __import__(_name)
    except Exception:
        _stub = types.ModuleType(_name)
        _stub.load_dataset = None
        sys.modules[_name] = _stub

import transformers  # noqa: E402
from kvpress import AdaKVPress, KnormPress  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig  # noqa: E402

NEW = 32
PRESSES = {
    "none": lambda: None,
    "knorm_0.5": lambda: KnormPress(compression_ratio=0.5),
    "knorm_0.75": lambda: KnormPress(compression_ratio=0.75),
    "knorm_0.8": lambda: KnormPress(compression_ratio=0.8),
    "adakv_knorm_0.5": lambda: AdaKVPress(KnormPress(compression_ratio=0.5)),
    "adakv_knorm_0.75": lambda: AdaKVPress(KnormPress(compression_ratio=0.75)),
}
DEFAULT_PRESSES = "none,knorm_0.5,knorm_0.8,adakv_knorm_0.5"


def main() -> None:
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    res = {"transformers": transformers.__version__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(), "rows": []}
    lengths = [int(x) for x in os.environ.get("LENGTHS", "32768,131072").split(",")]
    names = os.environ.get("PRESSES", DEFAULT_PRESSES).split(",")
    unknown = [n for n in names if n not in PRESSES]
    if unknown:
        sys.exit(f"PRESSES={','.join(unknown)} unknown; allowed: {', '.join(PRESSES)}")
    for t in lengths:
        ids = torch.randint(0, 128000, (1, t), device="cuda")
        for name in names:
            make = PRESSES[name]
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            press = make()
            cache = DynamicCache()
            torch.cuda.synchronize()
            t0 = time.time()
            with torch.no_grad():
                if press is None:
                    out = model(ids, past_key_values=cache, logits_to_keep=1)
                else:
                    with press(model):
                        out = model(ids, past_key_values=cache, logits_to_keep=1)
            torch.cuda.synchronize()
            t_prefill = time.time() - t0
            tok = out.logits[:, -1:].argmax(-1)
            pos = t
            with torch.no_grad():
                for i in range(NEW + 3):
                    if i == 3:
                        torch.cuda.synchronize()
                        t1 = time.time()
                    out = model(tok, past_key_values=cache, position_ids=torch.tensor([[pos]], device="cuda"),
                                logits_to_keep=1)
                    tok = out.logits[:, -1:].argmax(-1)
                    pos += 1
            torch.cuda.synchronize()
            t_dec = (time.time() - t1) / NEW
            row = {"T": t, "press": name, "prefill_s": round(t_prefill, 2),
                   "decode_ms_per_token": round(t_dec * 1e3, 2),
                   "kept_entries_layer0": int(cache.get_seq_length(0)),
                   "peak_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
            print(row, flush=True)
            res["rows"].append(row)
            del cache, out
    with open(os.path.join(os.environ.get("OUT", "."), "kvpress_speed.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
