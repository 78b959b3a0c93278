#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md in one command, most important first, for
# a lent GPU with little time: each run is cut off at its own limit and the whole session
# stops starting runs after $BUDGET seconds, so what finished is always written.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR [CASE...]]   (default: $OUT, else benchmarks/)
#
# CASEs (the names below, gpu_check included) pick runs for a second, shorter session;
# PROFILE=0 leaves out --profile where the profiler cannot trace the GPU (it costs a row
# about a minute).
#
# Writes <device>-<case>-<date>.json per run (experiments.bench --out) and session.log (with
# benchmarks/gpu_check.py's lines): 8 files at most, all that the device tool brings back.
set -u
out=${1:-${OUT:-benchmarks}}
shift $(( $# > 0 ))
only=" $* "
budget=${BUDGET:-540}
mkdir -p "$out"
log="$out/session.log"
# The GPU image has every dependency but no network: run from the checkout, no install.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One compilation cache for every run (outside $OUT, which comes back): the modes of a shape
# share their initialisation programs, and a rerun of a case compiles nothing.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu-session-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
py=$(command -v python3 || command -v python)

{ nvidia-smi -L; "$py" -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"; } >>"$log" 2>&1
# "NVIDIA H100 80GB HBM3" -> h100
device=$("$py" -c "import jax; k = jax.devices()[0].device_kind.split(); print((k[1] if len(k) > 1 else k[0]).lower())" 2>>"$log")
device=${device:-gpu}
date=$(date +%F)

timing=(--dtype bfloat16 --steps 20 --warmup 3)
common=("${timing[@]}")
[[ ${PROFILE:-1} == 0 ]] || common+=(--profile)
# SMALL / LARGE replace the two shapes, e.g. for a dry run of the whole session on a CPU:
#   SMALL="--shapes gpt2-tiny --pairs 2 --seq 64 --prompt 16" LARGE="$SMALL" \
#     bash benchmarks/gpu_session.sh /tmp/dry     (with --chunk-size 128 > seq: unchunked)
read -ra small <<<"${SMALL:---shapes gpt2-124m --pairs 8 --seq 512 --prompt 128}"
read -ra large <<<"${LARGE:---shapes gpt2-2.65b --pairs 2 --seq 512 --prompt 128}"
small+=(--remat none)
large+=(--remat block)

picked() { [[ $only == "  " || $only == *" $1 "* ]]; }

run() {  # run NAME LIMIT_S BENCH_FLAGS...
  local name=$1 limit=$2
  shift 2
  picked "$name" || return 0
  if (( SECONDS + 30 > budget )); then
    echo "== $name: not started ($SECONDS s of $budget used)" | tee -a "$log"
    return
  fi
  (( limit > budget - SECONDS )) && limit=$((budget - SECONDS))
  echo "== $name (limit ${limit} s, at ${SECONDS} s)" | tee -a "$log"
  timeout "$limit" "$py" -m experiments.bench "$@" --out "$out/$device-$name-$date.json" 2>&1 \
    | tee -a "$log"
}

# The goals' evidence first: each row's time, its profile, and (--breakdown) its parts
# timed alone, which holds even where the profiler cannot trace the GPU.
run gpt2-124m 220 "${small[@]}" "${common[@]}" --chunk-size 128 --modes adamw,logits-sam,sam \
  --breakdown
# The 2.65B candidate: block remat that keeps every matmul output without a batch dimension
# (+2.9 GiB of residuals as the jaxpr counts them) recomputes only attention and the
# elementwise ops: 44.9 TFLOP a step against block remat's 51.8 and no remat's 44.6
# (experiments.flops).
dots=(--chunk-size 128 --remat dots_with_no_batch_dims_saveable)
run gpt2-2.65b-dots 240 "${large[@]}" "${common[@]}" "${dots[@]}" --modes adamw,logits-sam
# Correctness, short: two small models' gradients, cuDNN's attention against XLA's (gpt2's
# passed on the first H200; llama-tiny's sliding window was not reached).
if picked gpu_check && (( SECONDS + 60 < budget )); then
  echo "== gpu_check (cuDNN attention on padded batches against XLA's, at ${SECONDS} s)" | tee -a "$log"
  timeout $((budget - SECONDS < 90 ? budget - SECONDS : 90)) "$py" benchmarks/gpu_check.py 2>&1 \
    | tee -a "$log"
fi
run gpt2-124m-unchunked 120 "${small[@]}" "${common[@]}" --modes adamw,logits-sam --breakdown
# The candidate's parts, apart from its rows above so that compiling them (a 32-layer trunk's
# backward, the reference's forward) cannot cost the logits-sam row; its step is cached.
run gpt2-2.65b-dots-parts 180 "${large[@]}" "${timing[@]}" "${dots[@]}" --modes adamw --breakdown
# TRL's configuration (block remat): adamw ran on the first H200 (149 ms), logits-sam not.
run gpt2-2.65b 240 "${large[@]}" "${common[@]}" --chunk-size 128 --modes adamw,logits-sam
run gpt2-2.65b-scanned 180 "${large[@]}" "${common[@]}" --chunk-size 128 --modes adamw,logits-sam --scan-layers
# No remat: 44.6 TFLOP, but 20 GiB of residuals as the jaxpr counts them (XLA keeps less:
# 124M's count is 7.1 GiB against a 6.6 GB peak); over 54 GB unless XLA keeps under about half.
run gpt2-2.65b-noremat 150 "${large[@]}" "${common[@]}" --chunk-size 128 --modes adamw --remat none
echo "== done at $SECONDS s" | tee -a "$log"
