#!/bin/bash
# One GPU session in stages (each a `run` call on the warm machine; see shared/gpu/README.md for the weights):
#   bash benchmarks/gpu_session.sh bench      carry .whl  — quantized-cache bench (+ batch rows) on random Llama-3.1-8B
#   bash benchmarks/gpu_session.sh compile    carry .whl  — compiled vs plain captured decode (bench --compile both)
#   bash benchmarks/gpu_session.sh profile    carry .whl  — kernel profile of the compiled step (PROF_COMPILE="--compile
#                                             max-autotune-no-cudagraphs": with tuned GEMMs); attention-only kernel
#   bash benchmarks/gpu_session.sh autotune   carry .whl  — PARTS="kernels autotune generate": kernel tests +
#                                             attention-only (+ launch-parameter sweep); 128k max-autotune rows
#                                             (AT_MODE=autotune: default compile too); graph_generate speed
#   bash benchmarks/gpu_session.sh part1      carry .wa   — first half of the SmolLM2 GGUF
#   bash benchmarks/gpu_session.sh accuracy   carry .wb   — assemble the GGUF, KVzip claim grid, quantization quality
#                                             (MT_T=seconds: the method table first, MT_N samples per task, graph decoding)
set -u
export PYTHONPATH=/tmp/site:src
python3 -c "import transformers; assert transformers.__version__=='5.23.0'" 2>/dev/null || \
  (rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
   --target /tmp/site .whl/*.whl)
OUT=${OUT:-/tmp/out}
R=/root/runs
mkdir -p $R
case "$1" in
bench)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 420 python3 -m kvforge.cli bench --random-weights --config llama3.1-8b --context 32k,128k \
    --presses none,kivi@bits=2@group_size=128,kivi@bits=4@group_size=128 --new-tokens 24 --device cuda \
    --hf-caches quanto@bits=2@group_size=128,quanto@bits=4@group_size=128 --out $R/bench_quant 2>&1 | grep -v Warn
  cp $R/bench_quant/bench.json $OUT/bench_quant.json; cp $R/bench_quant/bench.png $OUT/bench_quant.png
  timeout 150 python3 -m kvforge.cli bench --random-weights --config llama3.1-8b --context 32k --batch 4 \
    --presses none,knorm,adakv:knorm --ratios 0.75 --new-tokens 16 --device cuda --out $R/bench_b4 2>&1 | tail -4
  cp $R/bench_b4/bench.json $OUT/bench_batch4.json
  ;;
compile)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  timeout 150 python3 -m pytest -p no:cacheprovider tests/test_kernels.py \
    tests/test_engine.py::test_compiled_captured_decode_equals_captured_decode_on_cuda -x --tb=short 2>&1 | grep -v Warn | tail -${TB:-4}
  timeout ${B_T:-470} python3 -m kvforge.cli bench --random-weights --config llama3.1-8b --context ${CTX:-128k,32k} \
    --presses none,knorm,adakv:knorm --ratios 0.75 --new-tokens 16 --device cuda --compile both \
    --out $R/bench_compile 2>&1 | grep -v Warn | cut -c1-600
  cp $R/bench_compile/bench.json $OUT/bench_compile.json
  ;;
profile)
  timeout 120 python3 -m pytest -p no:cacheprovider -p no:logging --tb=short \
    tests/test_engine.py::test_compiled_captured_decode_equals_captured_decode_on_cuda 2>&1 | grep -E "^E |passed|failed" | head -20
  [ "${TEST_ONLY:-0}" = 1 ] && exit 0
  timeout ${PROF_T:-200} python3 benchmarks/profile_decode.py --context 131072 ${PROF:---press knorm --ratio 0.75} \
      ${PROF_COMPILE:---compile} \
      --out $OUT/profile_compiled_128k.json 2>&1 | grep -v Warn | head -24
  timeout 120 python3 benchmarks/gpu_attention.py 2>&1 | tail -25
  ;;
autotune)  # PARTS: any of kernels autotune generate (default: all)
  for part in ${PARTS:-kernels autotune generate}; do case $part in  # also: tests, tprofile
  tests)
    timeout 120 python3 -m pytest -p no:cacheprovider -p no:logging -q tests/test_kernels.py 2>&1 | tail -2 ;;
  kernels)
    timeout 120 python3 -m pytest -p no:cacheprovider -p no:logging -q tests/test_kernels.py 2>&1 | tail -2
    timeout 300 python3 benchmarks/gpu_attention.py 2>&1 | tail -72 ;;
  autotune)
    timeout ${B_T:-420} python3 -m kvforge.cli bench --random-weights --config llama3.1-8b --context 128k \
      --presses ${AT_PRESSES:-none,knorm,adakv:knorm} --ratios 0.75 --new-tokens 16 --device cuda \
      --compile ${AT_MODE:-max-autotune} \
      --out $R/bench_autotune 2>&1 | grep -E "^\{|bandwidth" | cut -c1-600
    cp $R/bench_autotune/bench.json $OUT/bench_autotune.json ;;
  tprofile)  # kernel profile of the max-autotune step (knorm 0.75, 128k): where its overhead above the floor goes
    timeout ${PROF_T:-300} python3 benchmarks/profile_decode.py --context 131072 ${PROF:---press knorm --ratio 0.75} \
      --compile max-autotune-no-cudagraphs --out $OUT/profile_autotune_128k.json 2>&1 | grep -v Warn | head -16 ;;
  generate)
    timeout ${G_T:-150} python3 benchmarks/generate_speed.py --random-weights --config llama3.1-8b --context 32768 \
      --new-tokens 32 --device cuda --out $OUT/generate_speed.json 2>&1 | grep "^{" ;;
  esac; done
  ;;
part1)
  mkdir -p /root/smol && cp .wa/smolpart.00 /root/smol/ && ls -la /root/smol
  ;;
accuracy)
  test -f /root/smol/smolpart.00 || { echo "part 1 missing: machine was given back"; exit 3; }
  cp .wb/smolpart.01 /root/smol/
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .wb/*.whl
  G=/root/smol/SmolLM2-135M-Instruct.Q4_1.gguf
  cat /root/smol/smolpart.00 /root/smol/smolpart.01 > $G
  echo "sha ok: $([ "$(sha256sum $G | cut -d' ' -f1)" = "$(cat .wb/sha)" ] && echo yes || echo NO)"
  [ "${MT_T:-0}" = 0 ] || { timeout $MT_T python3 benchmarks/method_table.py --model $G --device cuda --cuda-graph \
    --samples ${MT_N:-10} --out $R/methods 2>&1 | grep -v "eval:" | tail -36; cp $R/methods/method_table.md \
    $R/methods/summary.csv $R/methods/run_meta.json $OUT/ 2>/dev/null; }
  [ "${QQ_T:-200}" = 0 ] || KVFORGE_FUSED=${KVFORGE_FUSED:-1} timeout ${QQ_T:-200} python3 benchmarks/quant_quality.py --device cuda --samples 10 --model $G \
    --out $R/quant_quality 2>&1 | grep -v "eval:" | tail -14
  cp $R/quant_quality/quant_quality.md $R/quant_quality/summary.csv $OUT/ 2>/dev/null
  mv $OUT/summary.csv $OUT/quant_quality_summary.csv 2>/dev/null
  timeout ${KZ_T:-300} python3 benchmarks/kvzip_claim.py --device cuda --model $G --out $R/kvzip_claim \
    --md $R/kvzip_claim.md 2>&1 | grep -v "eval:" | tail -8
  python3 benchmarks/kvzip_claim.py --report-only --out $R/kvzip_claim --md $R/kvzip_claim.md 2>&1 | tail -3
  tar czf $OUT/kvzip_claim_runs.tgz -C $R kvzip_claim
  cp $R/kvzip_claim.md $OUT/ 2>/dev/null; cp $R/kvzip_claim/overhead.json $OUT/kvzip_overhead.json 2>/dev/null
  ;;
esac
