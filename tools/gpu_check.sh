#!/usr/bin/env bash
# The GPU machine's checks (a session has minutes of device time: read $OUT/*.log). From the
# repository root on the GPU machine, after tools/gpu_prepare.sh on the development machine and
# with .gpu carried:
#   source .gpu/env.sh && tools/gpu_check.sh [step ...]
# with no steps = all of them, most valuable first (a session may have less device time than
# they all take: every step writes its log as it ends, so what ran comes back even when the call
# is cut off). A step other than build builds first when the build directory is missing; the
# build makes only what the steps run (eellm and the gpu-labelled test programs).
# Steps (each logs to $OUT/<step>.log; a failing step does not stop the later ones):
#   build    configure + build (Release, sm_90a)
#   gpu      ctest -L gpu: the warp MMA register layouts the attention kernels assume
#            (gpu.WarpMma.*), the backend parity suite against the CPU on cuda, cuda-bf16 and
#            cuda-bf16w (bf16 GEMM tolerances; fused flash attention; bf16 operands), and NCCL at
#            world size 1
#   bench    eellm bench train on Llama 1.3B and GPT-2 124M (with exits) beside PyTorch in mixed
#            precision (cuda-bf16w)
#   hf       tools/hf_check.py: eellm's converter and logits against transformers, CPU and CUDA
#   demo     the quickstart on the GPU (cuda-bf16w): data, training the demo model (final and exit
#            validation losses to compare with the CPU's), generation with and without early exit
#   compare  the 1.3B at one micro-batch per step, with fp32 activations (cuda-bf16) and in plain
#            fp32 (cuda)
#   sanitize compute-sanitizer memcheck, racecheck and synccheck on the attention parity tests of
#            cuda-bf16w (the fused kernels with fp32 and with bf16 inputs, over several key tiles:
#            out-of-bounds accesses and shared-memory races, e.g. a cp.async into a buffer that
#            another warp still reads, which the CPU emulation cannot see)
set -uo pipefail
OUT=${OUT:-/tmp/eellm_gpu_out}
mkdir -p "$OUT"
B=${BUILD_DIR:-/tmp/eellm_gpu_build}
run() {  # run <step> <command...>
  local step=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$step.log" 2>&1
  local rc=$?
  echo "$step: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.log"
  tail -5 "$OUT/$step.log"
  return $rc
}
STEPS=" ${*:-build gpu bench hf demo compare sanitize} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
if want build || [ ! -x "$B/eellm" ]; then
  run build bash -c "cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES='90a-real;90-virtual' -DEELLM_FUZZ_SANITIZED=OFF &&
    cmake --build $B -j16 --target eellm backend_parity_tests gpu_tests warp_mma_gpu_tests" || exit 1
fi
# EELLM_REQUIRE_GPU=1: a gpu test that cannot reach the GPU fails instead of skipping; kernel
# faults are reported at the op that caused them (CUDA_LAUNCH_BLOCKING).
want gpu && run gpu bash -c "cd $B && EELLM_REQUIRE_GPU=1 CUDA_LAUNCH_BLOCKING=1 \
  ctest -L gpu --output-on-failure --timeout 300"
if want bench; then
# cuda-bf16w (bf16 operands, fp32 master weights) is the mixed-precision path: the headline runs
# beside PyTorch (compare: cuda-bf16, fp32 activations and FAST_16BF GEMMs, shows what bf16
# storage buys). The 1.3B headline accumulates gradients over 8 micro-batches of 4 x 2048 tokens per optimizer
# step (PyTorch too), as the large global batches behind Megatron's MFU figures do: the optimizer
# (AdamW, bf16 weight copies, gradient norm and zeroing: ~40 bytes of traffic per parameter) is
# then 1/8 of what one micro-batch per step would pay (compare shows that step).
run bench_llama "$B/eellm" bench train --model=configs/bench/llama_1p3b.json --backend=cuda-bf16w \
  --batch=32 --micro-batch=4 --seq=2048 --steps=3 --warmup=1 --torch-reference=tools/bench_torch.py
run bench_gpt2 "$B/eellm" bench train --model=configs/bench/gpt2_124m.json --backend=cuda-bf16w \
  --batch=8 --seq=1024 --steps=5 --warmup=2 --torch-reference=tools/bench_torch.py
fi
want hf && run hf python3 tools/hf_check.py --eellm "$B/eellm" --backends cpu,cuda
if want demo && [ -f .gpu/kjv.txt ]; then
  run demo bash -c "$B/eellm data --input .gpu/kjv.txt --output /tmp/eellm_kjv --val-fraction 0.02 &&
    $B/eellm train --config configs/kjv_demo.json --backend=cuda-bf16w --data=/tmp/eellm_kjv \
      --out=/tmp/eellm_kjv_run &&
    $B/eellm generate --checkpoint /tmp/eellm_kjv_run --backend=cuda-bf16w --compare"
fi
if want compare; then
run bench_llama_b4 "$B/eellm" bench train --model=configs/bench/llama_1p3b.json \
  --backend=cuda-bf16w --batch=4 --seq=2048 --steps=3 --warmup=1 --compare-without-exits=false
run bench_llama_bf16 "$B/eellm" bench train --model=configs/bench/llama_1p3b.json \
  --backend=cuda-bf16 --batch=4 --seq=2048 --steps=3 --warmup=1 --compare-without-exits=false
run bench_llama_fp32 "$B/eellm" bench train --model=configs/bench/llama_1p3b.json --backend=cuda \
  --batch=4 --seq=2048 --steps=2 --warmup=1 --compare-without-exits=false
fi
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if want sanitize && [ -x "$SAN" ]; then
  for tool in memcheck racecheck synccheck; do
    run "sanitize_$tool" env EELLM_PARITY_BACKEND=cuda-bf16w "$SAN" --tool "$tool" --error-exitcode 3 \
      "$B/tests/backend_parity_tests" --gtest_filter='BackendParity.Attention*:OperandParity.Attention*:OperandParity.Fused*'
  done
fi
# GEMMs cuBLASLt refused (the backend then runs cublasGemmEx with the same roundings): their
# shapes, from every step's log, for the next session to look at.
grep -h "eellm: cuBLASLt" "$OUT"/*.log 2>/dev/null | sort | uniq -c > "$OUT/cublaslt_refusals.txt"
echo "cuBLASLt refusals: $(wc -l < "$OUT/cublaslt_refusals.txt") distinct (cublaslt_refusals.txt)" \
  | tee -a "$OUT/summary.log"
cat "$OUT/summary.log"
