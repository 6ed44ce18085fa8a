#!/usr/bin/env bash
# The GPU machine's checks, in one command that ends inside a time budget. From the repository
# root on the GPU machine, after tools/gpu_prepare.sh on the development machine and with .gpu
# carried:
#   source .gpu/env.sh && tools/gpu_check.sh [--budget=SECONDS] [step ...]
# with no steps = all of them, most valuable first. A session has minutes of device time (15 in
# all, the machine's start included, at most 10 per command), so every step runs under `timeout`
# with what is left of the budget (default 540 s: a `run` with timeout_s 600 then always gets its
# files back), and a step that cannot start in time is reported as skipped. Name the skipped
# steps in a second call at once (the machine stays warm 30 s after a call), with --budget about
# status's budget_left_s minus 60: the build directory (build-gpu/, git-ignored, kept between
# calls on a warm machine) is then reused. The exit code is 1 when a step failed or was skipped.
#
# What comes back ($OUT keeps at most 8 files): summary.log (GPU, each step's start, exit code,
# time and last lines, the gpu step's test counts and failures, cuBLASLt refusals, cuDNN
# attention's plans and refusals), the logs
# that matter most as they are (gpu.log, bench_llama.log, bench_gpt2.log; their last 8 MiB),
# logs.tar.gz with every step's log, rewritten after each step, and running.log, the log of a
# step that a cut-off call interrupted.
#
# Steps:
#   build    configure + build (Release, sm_90a): eellm and the gpu-labelled test programs
#   gpu      cudnn_graph_tests (cuDNN's attention plans with this GPU's driver; its device
#            properties against the H200 fixture), then
#            ctest -L gpu: the warp MMA register layouts the attention kernels assume
#            (gpu.WarpMma.*), the backend parity suite against the CPU on cuda, cuda-bf16 and
#            cuda-bf16w (bf16 GEMM tolerances; fused flash attention; bf16 operands), and NCCL at
#            world size 1
#   profile  Nsight Compute (ncu, clocks left alone) on the first launch of each fused attention
#            kernel of ours (forward, dK/dV, dQ, decoding; EELLM_CUDNN_ATTENTION=0, so that cuDNN's do not
#            take their place) at the 1.3B's shape (eellm bench attention, batch 4 x
#            2048 tokens): speed of light, occupancy, warp stalls,
#            pipes and memory (the first GPU runs measured them at 92-122 TFLOP/s, a third of
#            PyTorch's SDPA on the same GPU: the largest gap of the step); after bench now that
#            cuDNN's attention takes the training path where it has a plan
#   bench    eellm bench attention (attention alone at the 1.3B's shape: cuDNN's fused attention,
#            ours with EELLM_CUDNN_ATTENTION=0, and cuDNN's non-deterministic backward with
#            =accumulating), eellm
#            bench train on Llama 1.3B and GPT-2 124M (with exits) beside PyTorch in mixed
#            precision (cuda-bf16w), and PyTorch's SDPA alone at the 1.3B's attention shape
#            (tools/bench_attention_torch.py); each `bench attention` also times a decoding step
#            (paged caches), and one runs at Llama-3-8B's GQA heads (configs/bench/llama3_8b.json)
#   sanitize compute-sanitizer memcheck, racecheck and synccheck (cuDNN off) on the attention and
#            paged-attention (prefill and decoding kernels) parity tests of
#            cuda-bf16w (the fused kernels with fp32 and with bf16 inputs, over several key tiles:
#            out-of-bounds accesses and shared-memory races, e.g. a cp.async into a buffer that
#            another warp still reads, which the CPU emulation cannot see)
#   compare  the 1.3B at one micro-batch per step, also with every projection its own GEMM
#            (EELLM_FUSED_PROJECTIONS=0), with fp32 activations (cuda-bf16) and in plain fp32 (cuda)
#   hf       tools/hf_check.py: eellm's converter and logits against transformers, CPU and CUDA
#   demo     the quickstart on the GPU (cuda-bf16w): data, training the demo model (final and exit
#            validation losses to compare with the CPU's), generation with and without early exit,
#            and `bench generate` (batched against one at a time) at batch 1 (with self-speculative
#            decoding from each exit against the full model) and 32; then a head-dim-64 variant
#            (configs/kjv_head_dim64.json) trained with cuDNN's attention and with ours
set -uo pipefail
BUDGET=540
STEPS=()
for a in "$@"; do
  case "$a" in
    --budget=*) BUDGET=${a#--budget=}
      [[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget needs whole seconds" >&2; exit 2; } ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    build | gpu | bench | profile | sanitize | compare | hf | demo) STEPS+=("$a") ;;
    *) echo "gpu_check.sh: unknown step or flag '$a' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build gpu bench profile hf demo sanitize compare)
STEP=build  # the step whose parts run now (what a second call names to run a skipped part)
want() { [[ " ${STEPS[*]} " == *" $1 "* ]] && STEP=$1; }

OUT=${OUT:-/tmp/eellm_gpu_out}
LOGS=$(mktemp -d /tmp/eellm_gpu_logs.XXXX)
B=${BUILD_DIR:-$PWD/build-gpu}
mkdir -p "$OUT"
rm -f "$OUT"/{summary,gpu,bench_llama,bench_gpt2,running}.log "$OUT"/logs.tar.gz{,.part}
FAILED=0
SUMMARY=$OUT/summary.log
DEADLINE=$((SECONDS + BUDGET))

pack() {  # every log into $OUT/logs.tar.gz (whole or not at all), the main ones beside it
  tar czf "$OUT/logs.tar.gz.part" -C "$LOGS" .
  (($? <= 1)) && mv "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"  # 1: a log grew while read
  for f in gpu bench_llama bench_gpt2; do
    if [ -f "$LOGS/$f.log" ]; then tail -c 8M "$LOGS/$f.log" > "$OUT/$f.log"; fi
  done
  return 0
}
skip() {  # skip <part> <why>
  local of=""
  [ "$1" != "$STEP" ] && of=" (part of step $STEP)"
  echo "$1$of: skipped, $2" | tee -a "$SUMMARY"
  FAILED=1
}
run() {  # run <step> <seconds needed to be worth starting> <most seconds it may take> <command...>
  local step=$1 need=$2 cap=$3
  shift 3
  local left=$((DEADLINE - SECONDS))
  if ((left < need)); then
    skip "$step" "${left} s of the budget left (needs ~${need} s)"
    return 1
  fi
  ((left > cap)) && left=$cap
  local start=$SECONDS
  echo "$step: started at ${start} s, at most ${left} s" >> "$SUMMARY"
  # the running step's log lives in $OUT, so that a call killed now still brings it back
  timeout --kill-after=10 "$left" "$@" < /dev/null > "$OUT/running.log" 2>&1
  local rc=$?
  mv "$OUT/running.log" "$LOGS/$step.log"
  local note=""
  ((rc == 124 || (rc == 137 && SECONDS - start >= left))) && note=" (cut off after ${left} s)"
  ((rc != 0)) && FAILED=1
  echo "$step: exit $rc in $((SECONDS - start)) s$note" | tee -a "$SUMMARY"
  tail -5 "$LOGS/$step.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  pack
  return $rc
}

# cuDNN's fused attention engines on Hopper are compiled at plan time: cuDNN opens NVRTC
# (libnvrtc.so.<its CUDA major>, then libnvrtc.so) through the loader path. Where cuDNN comes from
# Python's nvidia package, its NVRTC is beside it (cuda_nvrtc/lib in CUDA 12's wheels, cu13/lib in
# CUDA 13's); the toolkit's comes last.
NV=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)
for d in ${NV:+"$NV/cuda_nvrtc/lib" "$NV/cu13/lib"}; do
  [ -d "$d" ] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d
done

{
  echo "gpu_check.sh $(git rev-parse --short HEAD 2>/dev/null) steps: ${STEPS[*]}, budget ${BUDGET} s"
  timeout -k 5 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
  # which NVRTC cuDNN will find (its runtime-compiled attention engines need one)
  for so in libnvrtc.so.12 libnvrtc.so.13; do
    python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$so" 2>/dev/null &&
      echo "NVRTC: $so loads" || echo "NVRTC: no $so"
  done
  ls "${CUDNN_ROOT:-/nonexistent}"/lib 2>/dev/null | grep -m3 "cudnn_engines\|libcudnn.so" | sed 's/^/cuDNN: /'
} | tee "$SUMMARY"

built() { for f in eellm tests/backend_parity_tests tests/warp_mma_gpu_tests; do [ -x "$B/$f" ] || return 1; done; }
if want build || ! built; then
  # gpu_tests exists only where CMake found NCCL: build it when it is a target, else say so
  run build 60 400 bash -c 'cmake -S . -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES="90a-real;90-virtual" -DEELLM_FUZZ_SANITIZED=OFF || exit
    t="eellm backend_parity_tests warp_mma_gpu_tests cudnn_graph_tests"
    if ninja -C "$1" -t targets all | grep -q "^gpu_tests:"; then t="$t gpu_tests"
    else echo "gpu_check.sh: no gpu_tests target (NCCL not found): NCCL test not built"; fi
    cmake --build "$1" -j16 --target $t' _ "$B" ||
    { for s in "${STEPS[@]}"; do [ "$s" = build ] || STEP=$s skip "$s" "the build failed"; done; pack; exit 1; }
fi
# EELLM_REQUIRE_GPU=1: a gpu test that cannot reach the GPU fails instead of skipping; kernel
# faults are reported at the op that caused them (CUDA_LAUNCH_BLOCKING). The layouts first; the
# rest 8 at a time (one process per test, each with its own CUDA context: ~95 of them).
# cuDNN's attention plans first (cudnn_graph_tests, label unit, ~10 s): with the driver they
# finalize and say their workspace; this GPU's device properties are printed and checked against
# the H200 fixture the CPU-only runs use.
want gpu && run gpu 30 300 bash -c "cd '$B' && export EELLM_REQUIRE_GPU=1 CUDA_LAUNCH_BLOCKING=1 &&
  { ./tests/cudnn_graph_tests; c=\$?;
    ctest -L gpu -R WarpMma --no-tests=error --output-on-failure --timeout 120; a=\$?;
    ctest -L gpu -E WarpMma -j8 --no-tests=error --output-on-failure --timeout 300;
    exit \$((a | c | \$?)); }"
# The gpu step's counts and failed tests (its last lines show only the second ctest's end).
if want gpu && [ -f "$LOGS/gpu.log" ]; then
  grep -E "tests passed|tests failed out of|\(Failed\)|\(Timeout\)|Not Run|No tests were found|^pass [0-9]:|device properties:|FAILED  \] (Shapes|Cudnn)" \
    "$LOGS/gpu.log" | head -80 | cut -c1-700 | sed 's/^/    gpu: /' | tee -a "$SUMMARY"
fi
if want bench; then
  # Attention alone at the 1.3B's shape (seconds): cuDNN's, then our fused kernels; beside
  # PyTorch's SDPA below.
  # (cuDNN's own log at warning level: why a graph is refused, where it is.)
  run bench_attention_eellm 20 60 env CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGDEST_DBG=stderr \
    "$B/eellm" bench attention --model=configs/bench/llama_1p3b.json --backend=cuda-bf16w \
    --batch=4 --seq=2048
  run bench_attention_ours 20 60 env EELLM_CUDNN_ATTENTION=0 "$B/eellm" bench attention \
    --model=configs/bench/llama_1p3b.json --backend=cuda-bf16w --batch=4 --seq=2048
  # cuDNN's non-deterministic backward (dQ summed by atomics in an fp32 accumulator) wherever it
  # has a plan: what the deterministic one costs.
  run bench_attention_accumulating 20 60 env EELLM_CUDNN_ATTENTION=accumulating \
    "$B/eellm" bench attention \
    --model=configs/bench/llama_1p3b.json --backend=cuda-bf16w --batch=4 --seq=2048
  # cuda-bf16w (bf16 operands, fp32 master weights) is the mixed-precision path: the headline
  # runs beside PyTorch (compare: cuda-bf16, fp32 activations and FAST_16BF GEMMs, shows what
  # bf16 storage buys). The 1.3B headline accumulates gradients over 8 micro-batches of 4 x 2048
  # tokens per optimizer step (PyTorch too), as the large global batches behind Megatron's MFU
  # figures do: the optimizer (AdamW, bf16 weight copies, gradient norm and zeroing: ~40 bytes of
  # traffic per parameter) is then 1/8 of what one micro-batch per step would pay (compare shows
  # that step).
  run bench_llama 90 400 "$B/eellm" bench train --model=configs/bench/llama_1p3b.json \
    --backend=cuda-bf16w --batch=32 --micro-batch=4 --seq=2048 --steps=3 --warmup=1 \
    --torch-reference=tools/bench_torch.py
  # What PyTorch's SDPA (FlashAttention-class) reaches at the 1.3B's attention shape, beside the
  # AttentionForward/Backward lines of bench_llama's per-op table (micro-batch 4 there).
  run bench_attention 20 60 python3 tools/bench_attention_torch.py \
    --model=configs/bench/llama_1p3b.json --batch=4 --seq=2048
  run bench_gpt2 60 300 "$B/eellm" bench train --model=configs/bench/gpt2_124m.json \
    --backend=cuda-bf16w --batch=8 --seq=1024 --steps=5 --warmup=2 \
    --torch-reference=tools/bench_torch.py
  # Decoding with GQA at Llama-3-8B's heads (32 query heads on 8 KV heads of 128): the grouped
  # decoding kernel's GB/s of the cache read against the copy bandwidth (its last line); the
  # 1.3B's runs above show MHA (16/16).
  run bench_decode_gqa 20 60 "$B/eellm" bench attention --model=configs/bench/llama3_8b.json \
    --backend=cuda-bf16w --batch=8 --seq=2048 --steps=5
fi
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
if want profile && [ ! -x "$NCU" ]; then
  skip profile "no ncu"
elif want profile; then
  # The 1.3B's attention shape (4 x 2048 tokens) in `bench attention`: no model to build.
  run profile 40 180 bash -c 'for k in FlashForwardKernel FlashBackwardKvKernel FlashBackwardQKernel PagedDecodeKernel; do
      EELLM_CUDNN_ATTENTION=0 "$1" --clock-control none --kernel-name "regex:$k" --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats \
        "$2/eellm" bench attention --model=configs/bench/llama_1p3b.json --backend=cuda-bf16w \
        --batch=4 --seq=2048 --steps=1 --warmup=0 || exit; done' \
    _ "$NCU" "$B"
fi
want hf && run hf 60 200 python3 tools/hf_check.py --eellm "$B/eellm" --backends cpu,cuda
if want demo && [ ! -f .gpu/kjv.txt ]; then
  skip demo "no .gpu/kjv.txt (run tools/gpu_prepare.sh)"
elif want demo; then
  run demo 90 300 bash -c "'$B/eellm' data --input .gpu/kjv.txt --output /tmp/eellm_kjv \
      --val-fraction 0.02 &&
    '$B/eellm' train --config configs/kjv_demo.json --backend=cuda-bf16w --data=/tmp/eellm_kjv \
      --out=/tmp/eellm_kjv_run &&
    '$B/eellm' generate --checkpoint /tmp/eellm_kjv_run --backend=cuda-bf16w --compare &&
    '$B/eellm' bench generate --checkpoint /tmp/eellm_kjv_run --backend=cuda-bf16w --batch=1 \
      --draft-exits=2,4 &&
    '$B/eellm' bench generate --checkpoint /tmp/eellm_kjv_run --backend=cuda-bf16w --batch=32"
  # cuDNN's attention inside training (head dim 64, which cuDNN is offered; the demo's 32 is not)
  # and our fused kernels (EELLM_CUDNN_ATTENTION=0) on the demo's data: compare the final and
  # exit validation losses after 400 steps in the two logs' last lines (the runs round
  # differently, so they drift apart a little; a wrong gradient would not train as well). The
  # CPU emulation holds one step of it to the interpreter's roundings; this is cuDNN's own
  # kernels over a whole run.
  if [ -f /tmp/eellm_kjv.train.bin ]; then
    run train_d64_cudnn 20 90 env -u EELLM_CUDNN_ATTENTION "$B/eellm" train \
      --config configs/kjv_head_dim64.json --backend=cuda-bf16w --data=/tmp/eellm_kjv \
      --out=/tmp/eellm_d64_cudnn
    run train_d64_ours 20 90 env EELLM_CUDNN_ATTENTION=0 "$B/eellm" train \
      --config configs/kjv_head_dim64.json --backend=cuda-bf16w --data=/tmp/eellm_kjv \
      --out=/tmp/eellm_d64_ours
  else
    skip train_d64 "no /tmp/eellm_kjv data (the demo did not make it)"
  fi
fi
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if want sanitize && [ ! -x "$SAN" ]; then
  skip sanitize "no compute-sanitizer"
elif want sanitize; then
  for tool in memcheck racecheck synccheck; do
    # (our kernels: cuDNN's attention off; the paged passes run the decoding kernel too; the
    # staged cross-entropy's next-row copies (fp32 and bf16 rows) and the norms' one-pass
    # backward: racecheck sees what the emulation cannot, a copy into a chunk other threads still
    # read; the embedding gradient's CUB sort and run kernel)
    run "sanitize_$tool" 30 150 env EELLM_PARITY_BACKEND=cuda-bf16w EELLM_REQUIRE_GPU=1 \
      EELLM_CUDNN_ATTENTION=0 "$SAN" --tool "$tool" --error-exitcode 3 \
      "$B/tests/backend_parity_tests" \
      --gtest_filter='BackendParity.Attention*:BackendParity.PagedAttention*:OperandParity.Attention*:OperandParity.Fused*:BackendParity.CrossEntropy:OperandParity.CrossEntropy*:BackendParity.Embedding*:BackendParity.LayerNormAndRmsNorm'
  done
fi
if want compare; then
  run bench_llama_b4 40 150 "$B/eellm" bench train --model=configs/bench/llama_1p3b.json \
    --backend=cuda-bf16w --batch=4 --seq=2048 --steps=3 --warmup=1 --compare-without-exits=false
  # The same with every projection its own GEMM (q, k and v, and their gradients; SwiGLU's gate
  # and up, forward and backward).
  run bench_llama_b4_separate 40 150 env EELLM_FUSED_PROJECTIONS=0 "$B/eellm" bench train \
    --model=configs/bench/llama_1p3b.json --backend=cuda-bf16w --batch=4 --seq=2048 --steps=3 \
    --warmup=1 --compare-without-exits=false
  # And with every large GEMM shape's cuBLASLt algorithm chosen by timing (in the warmup step;
  # stderr lists each shape's candidates against the heuristic's first).
  run bench_llama_b4_tuned 40 150 env EELLM_GEMM_TUNE=1 "$B/eellm" bench train \
    --model=configs/bench/llama_1p3b.json --backend=cuda-bf16w --batch=4 --seq=2048 --steps=3 \
    --warmup=1 --compare-without-exits=false
  run bench_llama_bf16 40 150 "$B/eellm" bench train --model=configs/bench/llama_1p3b.json \
    --backend=cuda-bf16 --batch=4 --seq=2048 --steps=3 --warmup=1 --compare-without-exits=false
  run bench_llama_fp32 40 150 "$B/eellm" bench train --model=configs/bench/llama_1p3b.json \
    --backend=cuda --batch=4 --seq=2048 --steps=2 --warmup=1 --compare-without-exits=false
fi
# GEMMs cuBLASLt refused (the backend then runs cublasGemmEx with the same roundings): their
# shapes, from every step's log, for the next session to look at.
{
  echo "cuBLASLt refusals (count, message):"
  grep -h "eellm: cuBLASLt" "$LOGS"/*.log 2>/dev/null | sort | uniq -c
  echo "cuDNN attention (count, plan or refusal per shape):"
  grep -h "cuDNN attention" "$LOGS"/*.log 2>/dev/null | sort | uniq -c | head -20
  echo "done in $SECONDS s$( ((FAILED)) && echo ', some steps failed or were skipped')"
} | tee -a "$SUMMARY"
pack
exit $FAILED
