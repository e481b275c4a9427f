#!/usr/bin/env bash
# The real-weight GPU tables of benchmarks/README.md, reproducible on one CUDA GPU (≥ 80 GB) with kvforge installed:
#
#   bash benchmarks/gpu_tables.sh quality   # KVLink accuracy, sharing perplexity, streaming perplexity (jobs at once)
#   bash benchmarks/gpu_tables.sh speed     # timings, one at a time on a quiet GPU: streaming 100k, sharing
#                                           # throughput, KVLink TTFT, prefill memory / overhead / capacity
#   bash benchmarks/gpu_tables.sh accuracy  # the method table of benchmarks/accuracy/ (both models; PARTS= picks
#                                           # parts) and the kvpress agreement (kvpress 0.5.5 apart: KVPRESS_PATH)
#   bash benchmarks/gpu_tables.sh gpt2      # streaming on the GPT-2 trained here (only wheels and text carried)
#   bash benchmarks/gpu_tables.sh link      # KVLink: TTFT alone, then training (link rows at their own rate) and
#                                           # full / naive / links on that one fine-tuned model
#   bash benchmarks/gpu_tables.sh sharing   # cross-layer sharing throughput (#19), 8-10 minutes, alone
#   bash benchmarks/gpu_tables.sh memory    # #21: prefill peak / press overhead at 128k, chunked and not, and
#                                           # kvpress's peak in the same session (KVPRESS_PATH), ~5 minutes, alone
#   bash benchmarks/gpu_tables.sh press-profile  # #21: the kernels and host time inside each press at 128k
#   bash benchmarks/gpu_tables.sh sharing-profile  # #19: a sliding preset's decode step; stock sliding layer vs WindowLayer
#   bash benchmarks/gpu_tables.sh decode    # #21: decode with default flags, 32k/128k, twice (cold, then cached)
#   bash benchmarks/gpu_tables.sh capacity  # #21: the longest context on a GPU of MEMORY_GB (default 24), not yet timed
#   bash benchmarks/gpu_tables.sh status    # what is running, the last line of each log (brief: counts, failures)
#
# Check the captured streaming step on this GPU first: `pytest -m cuda tests -o addopts=""` (the quality jobs use
# --cuda-graph). Results go to $RUNS (default runs/gpu); every command resumes when re-run. The quality jobs share the GPU (about
# 70 GB at peak on an H100 80GB), so their timings are not speed claims; the speed phase runs alone.
set -uo pipefail
RUNS=${RUNS:-runs/gpu}
LOGS=$RUNS/logs
mkdir -p "$LOGS"
KV=${KV:-kvforge}
export PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 TQDM_MININTERVAL=20
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

job() {  # job NAME COMMAND...: run in the background (its own session), log and exit code in $LOGS
  local name=$1; shift
  setsid bash -c "{ $*; } > $LOGS/$name.log 2>&1; echo \$? > $LOGS/$name.rc" < /dev/null > /dev/null 2>&1 &
}
wait_for() { for n in "$@"; do while [ ! -f "$LOGS/$n.rc" ]; do sleep 5; done; done; }

SMOL="--model smollm2-135m --device cuda --dtype float32"
HELD="--text-file shakespeare:heldout --tokens 20000 --rows 4 --sinks 4"

case "${1:-status}" in
quality)
  python3 -c "from kvforge.streaming.data import read_text; open('$RUNS/shakespeare_train.txt', 'w').write(read_text('shakespeare:train'))"
  # KVLink: train, then every mode on the base model and full/naive on the fine-tuned one (the fair comparison)
  job link "$KV train kvlink --model smollm2-135m --device cuda --steps 800 --batch 16 --lr 2e-5 --out $RUNS/smol-kvlink \
    && $KV link eval --model smollm2-135m --links $RUNS/smol-kvlink --device cuda --docs 10 --samples 70 --no-ttft --out $RUNS/link-eval \
    && $KV link eval --model $RUNS/smol-kvlink --device cuda --docs 10 --samples 70 --modes full,naive --no-ttft --out $RUNS/link-eval-finetuned"
  # cross-layer sharing: dense baseline, cla, lckv (4 warm-up layers), 400 steps each, one after another
  job sharing "for P in dense cla lckv; do python3 benchmarks/sharing_perplexity.py --text-file $RUNS/shakespeare_train.txt \
    --presets \$P --warmup 4 --steps 400 --batch-size 16 --seq-len 512 --device cuda --out $RUNS/share_\$P || exit 1; done"
  # streaming, SmolLM2: one process per cache size; KV-Align on every size, then its kv rows
  for C in 32 64 128 256 1024; do
    job ppl_smol_$C "$KV ppl $SMOL $HELD --modes full,sw,ar,window --cache-sizes $C --cuda-graph --out $RUNS/ppl_smol_$C"
  done
  job kv_smol "$KV train kv-align $SMOL --text-file shakespeare:train --cuda-graph --alphas 0,0.25,0.5,0.75,1 --lm-steps 600 --out $RUNS/kv-smol \
    && for C in 32 64 128 256 1024; do $KV ppl $SMOL $HELD --modes kv --kv-align $RUNS/kv-smol --cache-sizes \$C \
       --cuda-graph --out $RUNS/ppl_smolkv_\$C || exit 1; done"
  # streaming, GPT-2 trained here: train, KV-Align on every size incl. 1024, then all modes
  GPT="--model $RUNS/gpt2 --device cuda --dtype float32"
  job gpt2 "$KV train gpt2 --text-file shakespeare:train --heldout shakespeare:heldout --steps 1500 --device cuda --out $RUNS/gpt2 \
    && $KV train kv-align $GPT --text-file shakespeare:train --key-hidden 256,64 --value-hidden 64,128 --streams 32 --cuda-graph --alphas 0,0.25,0.5,0.75,1 --lm-steps 600 --lm-rows 16 --out $RUNS/kv-gpt2 \
    && for C in 32 64 128 256 1024; do $KV ppl $GPT $HELD --modes sw,ar,window,kv --kv-align $RUNS/kv-gpt2 \
       --cache-sizes \$C --cuda-graph --out $RUNS/ppl_gpt2_\$C || exit 1; done"
  echo "started; follow with: bash $0 status"
  ;;
speed)
  [ -f "$LOGS/gpt2.log" ] && wait_for gpt2  # a running quality phase first trains the GPT-2 used below
  $KV stream $SMOL --mode sw --cache-size 1024 --num-tokens 100000 --quiet --cuda-graph --compare-ar 2000 --out $RUNS/stream_smol
  [ -d "$RUNS/gpt2" ] && $KV stream --model $RUNS/gpt2 --device cuda --dtype float32 --mode sw --cache-size 1024 \
    --num-tokens 100000 --quiet --cuda-graph --compare-ar 5000 --out $RUNS/stream_gpt2
  for CFG in llama3.2-1b llama3.1-8b; do
    $KV bench --random-weights --config $CFG --context 2k --presses none --sharing lckv,cla,yoco --new-tokens 512 \
      --batch 8 --device cuda --out $RUNS/sharing_bench_$CFG
    $KV bench --random-weights --config $CFG --max-batch --context 2k --presses none --sharing lckv,cla,yoco \
      --device cuda --out $RUNS/sharing_capacity_$CFG
  done
  python3 benchmarks/link_ttft.py --config llama3.1-8b --repeats 7 --device cuda --out $RUNS/link_ttft.json
  $KV bench --random-weights --config llama3.1-8b --context 128k --presses none,knorm,snapkv,tova,adakv:snapkv \
    --ratios 0.75 --prefill-chunk none,8k --new-tokens 16 --device cuda --compile off --out $RUNS/prefill_memory
  $KV bench --random-weights --config llama3.1-8b --max-context --presses none,knorm --ratios 0.75 \
    --prefill-chunk none,8k --search-limit 1024k --device cuda --out $RUNS/capacity_context
  ;;
accuracy)
  # The method table of benchmarks/accuracy/ (README there): PARTS picks what runs (default: all of it), e.g.
  # PARTS="extra decode quant agree" for what the committed table lacks; then merge into it:
  #   python3 benchmarks/accuracy_table.py merge --out benchmarks/accuracy/$M benchmarks/accuracy/$M $RUNS/acc*_${M}_*
  # Many small processes share one GPU (start MPS first where it runs: gpu_session.sh mps), at most JOBS at a
  # time (one CPU core each: eager decoding is launch-bound), from a queue in the order written, slowest first.
  PARTS=${PARTS:-prefill extra decode quant agree}
  P=random,streamingllm,knorm,l2norm,snapkv,pyramidkv,adakv,tova,observed_attention,expected_attention,kvzip,cam,kvmerger
  D=h2o,scissorhands,tova_decode,quest,decoding
  R="--ratios 0.25,0.5,0.75,0.9"
  TASKS="niah_single_1 niah_multikey_1 niah_multivalue vt cwe fwe facts_qa"
  Q=$LOGS/queue_$(date +%s%N).tsv  # a queue per call: a later call's jobs run beside an earlier call's
  queue() { local name=$1; shift; printf '%s\t%s\n' "$name" "$*" >> "$Q"; }
  case " $PARTS " in *" agree "*)
    queue agree "python3 benchmarks/kvpress_agreement.py --kvpress-path ${KVPRESS_PATH:-/tmp/kvp} --out $RUNS/agree \
      --model smollm2-135m --task niah_single_1 --length 4000 --samples 100 --ratio 0.5 --device cuda" ;;
  esac
  MODELS=${MODELS:-smollm2-135m gemma3-270m}
  e() { echo "--model $1 --device cuda --cuda-graph --length 4k --samples 100"; }
  case " $PARTS " in *" extra "*)  # headkv's head scores (calibrated on niah, 4 samples), before its rows
    for M in $MODELS; do
      queue headkv_$M "$KV headkv-scores --model $M --device cuda --length 4000 --out $RUNS/headkv_$M.json"
    done ;;
  esac
  for T in $TASKS; do for M in $MODELS; do
    case " $PARTS " in *" decode "*)  # batched over samples only (25: recorded queries and KV of 4k rows, many jobs)
      queue accd_${M}_$T "$KV eval $(e $M) --tasks $T --presses $D $R --sample-batch 25 --out $RUNS/accd_${M}_$T" ;;
    esac
    case " $PARTS " in *" quant "*)  # samples of equal token counts together (padding would shift token groups)
      for F in gear kvquant kivi; do
        queue accq_${M}_${T}_$F "$KV eval $(e $M) --tasks $T --presses $F@bits=2,$F@bits=4 --sample-batch 25 \
          --out $RUNS/accq_${M}_${T}_$F"
      done ;;
    esac
  done; done
  for T in $TASKS; do for M in $MODELS; do
    case " $PARTS " in *" prefill "*)
      queue acc_${M}_$T "$KV eval $(e $M) --tasks $T --presses $P $R --press-batch 8 --sample-batch 8 --out $RUNS/acc_${M}_$T" ;;
    esac
    case " $PARTS " in *" extra "*)
      queue accx_${M}_$T "test -f $RUNS/headkv_$M.json && $KV eval $(e $M) --tasks $T \
        --presses nacl,think,minicache,headkv@scores_path=$RUNS/headkv_$M.json $R --press-batch 8 --sample-batch 8 \
        --out $RUNS/accx_${M}_$T" ;;
    esac
  done; done
  # ~9 GB per job at most (a 4k sample batch's recorded queries, KV and forks): 14 on an H200, 8 on 80 GB
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  JOBS=${JOBS:-$([ "${mib:-0}" -gt 100000 ] && echo 14 || echo 8)}
  # the dispatcher: JOBS lines of the queue at a time, each with its log and exit code in $LOGS
  cat > "$LOGS/one.sh" <<'ONE'
n=${1%%$'\t'*}; c=${1#*$'\t'}
eval "$c" > "$LOGS/$n.log" 2>&1; echo $? > "$LOGS/$n.rc"
ONE
  LOGS=$LOGS setsid xargs -d '\n' -P "$JOBS" -n 1 bash "$LOGS/one.sh" < "$Q" > "$LOGS/dispatcher.out" 2>&1 &
  echo "$(wc -l < "$Q") jobs queued, $JOBS at a time; follow with: bash $0 status"
  ;;
gpt2)  # streaming on the GPT-2 trained here, nothing but wheels and text carried (gpu_session.sh text): train it,
  # then sw/ar/window per cache size beside KV-Align's training (K/V fit + next-token stage), then kv per size
  T=${TEXT:-/root/text}
  GPT="--model $RUNS/gpt2 --device cuda --dtype float32"
  H="--text-file $T/heldout.txt --tokens 20000 --rows 4 --sinks 4"
  job gpt2 "[ -f $RUNS/gpt2/config.json ] || $KV train gpt2 --text-file $T/train.txt --heldout $T/heldout.txt --steps 1500 \
    --device cuda --out $RUNS/gpt2"
  job kv_gpt2 "while [ ! -f $LOGS/gpt2.rc ]; do sleep 5; done && $KV train kv-align $GPT --text-file $T/train.txt \
    --key-hidden 256,64 --value-hidden 64,128 --streams 32 --cuda-graph --alphas 0,0.25,0.5,0.75,1 --lm-steps 600 \
    --lm-rows 16 --out $RUNS/kv-gpt2"
  for C in 32 64 128 256 1024; do
    job ppl_gpt2_$C "while [ ! -f $LOGS/gpt2.rc ]; do sleep 5; done && $KV ppl $GPT $H --modes sw,ar,window --cache-sizes $C \
      --cuda-graph --out $RUNS/ppl_gpt2_$C && while [ ! -f $LOGS/kv_gpt2.rc ]; do sleep 5; done && $KV ppl $GPT $H --modes kv \
      --kv-align $RUNS/kv-gpt2 --cache-sizes $C --cuda-graph --out $RUNS/ppl_gpt2_$C"
  done
  # the 100k-token stream starts from a prompt that fills the cache, so that its first 1k tokens are captured steps
  # too (from a short prompt the first 1k run eagerly while the cache fills: 2.38 vs 1.02 ms/token on an H100)
  echo "gpt2 jobs started; follow with: bash $0 brief; then, alone: $KV stream $GPT --mode sw --cache-size 1024 \
    --prompt \"\$(head -c 6000 $T/heldout.txt)\" --num-tokens 100000 --quiet --cuda-graph --compare-ar 5000 \
    --out $RUNS/stream_gpt2_long"
  ;;
sharing)  # the same-run throughput table of every preset (random Llama-3.1-8B, 2k prompts, 512 new tokens, prefill in
  # 256-token chunks), alone on the GPU. Each model's limit is predicted from two memory probes (--probe: untimed,
  # one token after a 2,560-token prompt, at 32 and 64 rows), then timed just under it and a quarter above.
  # PRESETS= picks models (a call cut short resumes: re-run it). lckv (minutes per timed run: 9 passes per prefill
  # chunk) gets its limit from probes only (one pass per chunk: the same memory) and one timed row at LCKV_TIMED
  # rows (default 128). MEMORY_GIB caps the process (e.g. 79 on an H200, for an 80 GB card's limits).
  # ATTENTION=kvforge: every model on kvforge's attention (no repeat_kv copy of the KV). Every model runs with
  # expandable segments (with the default allocator yoco at 384 rows failed on fragmentation: 57.5 GiB allocated,
  # 74.5 reserved; A/B: add `--allocator default --sliding-layer stock|window` to one yoco --batches 384 run).
  # CONFIG_1B=1: the same table on the Llama-3.2-1B shapes, probes at 128 and 256 rows.
  CFG=llama3.1-8b; TAG=8b; MIN=32
  [ -n "${CONFIG_1B:-}" ] && { CFG=llama3.2-1b; TAG=1b; MIN=128; }
  S="python3 benchmarks/sharing_throughput.py --config $CFG --prompt 2048 --new-tokens 512 --prefill-chunk 256 \
    --attention ${ATTENTION:-sdpa} --resolution 4 --max-batch 8192 --min-batch $MIN \
    ${MEMORY_GIB:+--memory-gib $MEMORY_GIB} --out $RUNS/sharing_tp_${TAG}_${ATTENTION:-sdpa}.jsonl"
  for P in ${PRESETS:-dense cla yoco mixattention lckv}; do
    if [ "$P" = lckv ]; then
      $S --presets lckv --probe --probe-only 2>&1 | grep -av '^{'
      $S --presets lckv --batches ${LCKV_TIMED:-128} 2>&1 | grep -av '^{'
    else
      $S --presets $P --probe 2>&1 | grep -av '^{'
    fi
  done
  ;;
memory)  # #21, one call on a quiet GPU: kvforge's rows, then kvpress 0.5.5 (its own transformers, KVPRESS_PATH) on
  # the same machine right after, so that the peaks compare within one session
  $KV bench --random-weights --config llama3.1-8b --context 128k --presses none,knorm,snapkv,tova,adakv:snapkv \
    --ratios 0.75 --prefill-chunk none,8k --new-tokens 16 --device cuda --compile off --out $RUNS/prefill_memory
  [ -d "${KVPRESS_PATH:-/tmp/kvp}" ] && PRESSES=none,knorm_0.75 LENGTHS=131072 OUT=$RUNS/prefill_memory \
    PYTHONPATH=${KVPRESS_PATH:-/tmp/kvp} python3 benchmarks/kvpress_speed.py
  ;;
press-profile)  # #21 item 3: where each press's time at 128k goes (kernels and host time inside `compress`), ~2 min
  python3 benchmarks/profile_press.py --context 131072 --presses knorm,snapkv,tova,adakv:snapkv --ratio 0.75 \
    --out $RUNS/profile_press_128k.json
  ;;
sharing-profile)  # #19: the kernels of a decode step at 128 rows, dense against the sliding presets, then transformers'
  # sliding layer against WindowLayer on the same yoco model and prompts (tokens must match), ~5 min
  python3 benchmarks/profile_sharing_decode.py --presets dense,yoco,mixattention --batch 128 \
    --out $RUNS/profile_sharing_decode.json
  python3 benchmarks/window_layer_decode.py --preset yoco --config llama3.1-8b --batch 128 --new-tokens 64 \
    --out $RUNS/window_layer_decode_yoco.json
  ;;
decode)  # #21 item 4: decode with default flags (--compile auto: max-autotune on CUDA, tuning cached on disk), 32k
  # and 128k, none and knorm 0.75, twice in two processes: the second reads the compiled step from the disk cache
  # (first_step_s); ~7 minutes on a fresh machine
  for R in 1 2; do
    $KV bench --random-weights --config llama3.1-8b --context 32k,128k --presses none,knorm --ratios 0.75 \
      --new-tokens 16 --device cuda --out $RUNS/decode_default_$R
  done
  ;;
capacity)  # #21: the longest context that fits a GPU of MEMORY_GB (the allocator is capped there), none and knorm
  # 0.75, unchunked and in 8k chunks; searched to 16k (a try near the top is a prefill of several 100k tokens)
  $KV bench --random-weights --config llama3.1-8b --max-context --presses none,knorm --ratios 0.75 \
    --prefill-chunk none,8k --memory-limit ${MEMORY_GB:-24} --search-step 16384 --search-limit 1024k --device cuda \
    --out $RUNS/capacity_context
  ;;
link)  # KVLink (#18): time to first token on the quiet GPU first (TTFT=0 skips it), then, in the background, per
  # model in MODELS (default smollm2-135m; gemma3-270m needs its carries, gpu_session.sh): training (STEPS x BATCH,
  # default 800 x 16; BATCH=64 is the reference's batch; LINK_LR gives the link rows their own rate, e.g. 3e-4;
  # CAUSAL=0.6 trains that share of samples as ordinary causal sequences without links, as the reference does)
  # and full / naive / links on that one fine-tuned model, the fair comparison, for single-hop and two-hop
  # questions (--hops 2: the answer combines two documents); then, unless BASE=0 (a second set-up of a model started
  # beside the first), the base model's full / naive / recompute rows for both
  if [ "${TTFT:-1}" != 0 ]; then
    python3 benchmarks/link_ttft.py --config llama3.1-8b --docs 10 --doc-tokens 1000 --question 64 --repeats 7 \
      --device cuda --out $RUNS/link_ttft.json > $LOGS/link_ttft.log 2>&1; tail -c 1500 $LOGS/link_ttft.log
  fi
  N=${STEPS:-800}; B=${BATCH:-16}
  for M in ${MODELS:-smollm2-135m}; do
    D=$RUNS/kvlink-$M-s${N}b$B${LINK_LR:+-lr$LINK_LR}${CAUSAL:+-c$CAUSAL}
    base="true"
    [ "${BASE:-1}" = 1 ] && base="for H in 1 2; do $KV link eval --model $M --device cuda --docs 10 --samples 70 \
      --hops \$H --modes full,naive,recompute --no-ttft --out $RUNS/kvlink-$M-base-eval-hops\$H || exit 1; done"
    job link_$(basename $D) "$KV train kvlink --model $M --device cuda --steps $N --batch $B --lr 2e-5 \
        ${LINK_LR:+--link-lr $LINK_LR} ${CAUSAL:+--causal-fraction $CAUSAL} --out $D \
      && for H in 1 2; do $KV link eval --model $D --links $D --device cuda --docs 10 --samples 70 --hops \$H \
         --modes full,naive,links --no-ttft --out $D-eval-hops\$H || exit 1; done && $base"
  done
  echo "link jobs started; follow with: bash $0 brief"
  ;;
brief)  # counts, failures and the running jobs' last progress line, short
  echo "done $(grep -lx 0 "$LOGS"/*.rc 2>/dev/null | wc -l) failed $(grep -Lx 0 "$LOGS"/*.rc 2>/dev/null | wc -l) of $(cat "$LOGS"/queue_*.tsv 2>/dev/null | wc -l)"
  for f in $(grep -Lx 0 "$LOGS"/*.rc 2>/dev/null); do echo "FAILED $(basename "$f" .rc): $(tail -c 300 "${f%.rc}.log")"; done
  for f in "$LOGS"/*.log; do
    [ -f "${f%.log}.rc" ] && continue
    echo "$(basename "$f" .log): $(tail -c 200 "$f" | tr '\r' '\n' | grep -av '^\s*$' | tail -1 | cut -c1-110)"
  done
  ;;
status)
  for f in "$LOGS"/*.log; do
    [ -e "$f" ] || { echo "nothing started in $RUNS"; break; }
    n=$(basename "$f" .log); rc=$(cat "$LOGS/$n.rc" 2>/dev/null || echo running)
    echo "== $n [$rc] $(tail -c 300 "$f" | tr '\r' '\n' | grep -av '^\s*$' | tail -1)"
  done
  ;;
*) echo "usage: bash $0 quality|speed|accuracy|gpt2|link|status|brief"; exit 2 ;;
esac
