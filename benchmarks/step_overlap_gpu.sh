#!/usr/bin/env bash
# The step-overlap issue's GPU runs, in one call of the device tool (one GPU, Python 3.12; wheels in .whl/ as
# front_door_gpu.sh lists them), each step under its own timeout so the whole stays inside the call's 10 minutes:
#   tests     the engine on CUDA: greedy equality with transformers, CUDA graph replays equal eager runs, the
#             engine core process, the sampler's device paths, structured output's masks
#   compare   benchmarks/compare_hf.py (decode1, throughput; 7B layout, random weights, bf16) for this checkout
#             and, with --skip-transformers, for the baseline tree in .base/ (`git archive <commit> vlserve`)
#   profile   benchmarks/profile_steps.py on the throughput workload (GPU busy share, host syncs)
#   trace     one stream's timeline (benchmarks/profile_steps.py --trace-dir, 128 tokens), gzipped into $OUT
#   memory    benchmarks/memory_model.py: the planner's activation and KV figures against the engine's
#   serve     256 requests, 512 in / 256 out, through HTTP (streaming) and offline: benchmarks/front_door.py
#   int4      benchmarks/int4_gemm.py: the int4 Triton kernels against bf16 F.linear on the 7B layer shapes
#   quant     benchmarks/quantized_decode.py: the 7B layout dense, AWQ and GPTQ (decode1, throughput)
#   qwen3     benchmarks/compare_hf.py --layout qwen3-vl-8b (decode1, throughput, ttft; transformers beside)
# usage: bash benchmarks/step_overlap_gpu.sh [tests] [compare|compare-vlserve] [profile] [serve] [memory] [trace]
#        [base] [profile-base] [int4] [quant] [qwen3]
#   (default: tests compare profile)
set -uo pipefail
OUT=${OUT:-/tmp/step-overlap-out}
source benchmarks/gpu_site.sh
steps=${*:-tests compare profile}
has() { [[ " $steps " == *" $1 "* ]]; }
if has tests; then
  VLSERVE_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_async_scheduling.py \
    tests/test_async_engine.py tests/test_engine.py tests/test_sampler.py tests/test_cuda_graphs.py \
    tests/test_structured_output.py tests/test_prompt_logprobs.py tests/test_model_equality.py tests/test_quantized.py \
    tests/test_int4_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -15
fi
if has base; then
  (cd .base && PYTHONPATH="$PWD:/tmp/site" timeout 150 python3 "$OLDPWD/benchmarks/compare_hf.py" --skip-transformers \
     --workloads decode1,throughput --json "$OUT/compare_before.json") 2>&1 | grep -vE "Warning|warn" | tail -12
fi
if has compare || has compare-vlserve; then  # compare-vlserve: without transformers' runs (short device time)
  skip=$(has compare-vlserve && echo --skip-transformers)
  timeout 180 python3 benchmarks/compare_hf.py $skip --workloads decode1,throughput --json "$OUT/compare_after.json" \
    2>&1 | grep -vE "Warning|warn" | tail -14
fi
profile() {  # $1: label, $2: the tree whose vlserve runs
  (cd "$2" && PYTHONPATH="$PWD:/tmp/site" timeout 150 python3 "$OLDPWD/benchmarks/profile_steps.py" \
     --workloads decode1,throughput --num-requests 128 --output-len 64) 2>&1 | tee "$OUT/profile_$1.log" \
    | grep -E "^==|cudaStreamSynchronize|cudaEventSynchronize|Self CUDA time|Self CPU time"
}
if has serve; then  # 256 requests through `vlserve serve` + `vlserve bench serve` (streaming) against offline
  mkdir -p /tmp/qwen7b && python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from compare_hf import write_model_folder; write_model_folder('7b', Path('/tmp/qwen7b'))"
  timeout 240 python3 benchmarks/front_door.py /tmp/qwen7b --skip preprocess health --num-prompts 256 \
    --input-len 512 --output-len 256 --engine-flags "--load-format dummy --max-model-len 1024" \
    --json "$OUT/serve_after.json" 2>&1 | grep -E "^overhead|Error"
fi
if has memory; then  # the planner's memory model against the engine's profiling step (7B layout)
  timeout 150 python3 benchmarks/memory_model.py --json "$OUT/memory_model.json" 2>&1 | grep -vE "Warning|warn" \
    | tail -25
fi
if has trace; then
  timeout 120 python3 benchmarks/profile_steps.py --workloads decode1 --output-len 128 --trace-dir "$OUT/trace" \
    2>&1 | grep -vE "Warning|warn" | tee "$OUT/trace.log" | head -40
  gzip -f "$OUT"/trace/*.json
fi
if has int4; then
  timeout 150 python3 benchmarks/int4_gemm.py --json "$OUT/int4_gemm.json" 2>&1 | grep -vE "Warning|warn" | tail -60
fi
if has quant; then
  timeout 300 python3 benchmarks/quantized_decode.py --json "$OUT/quantized_decode.json" 2>&1 \
    | grep -vE "Warning|warn" | tail -14
fi
if has qwen3; then
  timeout 280 python3 benchmarks/compare_hf.py --layout qwen3-vl-8b --workloads decode1,throughput,ttft \
    --json "$OUT/compare_qwen3_vl_8b.json" 2>&1 | grep -vE "Warning|warn" | tail -14
fi
has profile-base && profile before .base
has profile && profile after .
