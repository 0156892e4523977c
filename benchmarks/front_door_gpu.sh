#!/usr/bin/env bash
# The front-door issue's GPU runs, for the device tool (one GPU, Python 3.12, no FastAPI there: wheels in .whl/).
#   tests: the engine core process on CUDA, greedy equality, media (PyAV 19), the front door's hostile-client tests
#   bench: benchmarks/front_door.py for this checkout and for the baseline in .old/ (git archive of the commit
#          before), the same script: preprocessing 1 vs all cores, /health under load (tiny model), and
#          HTTP vs offline throughput with the Qwen2.5-VL-7B layout (random weights, bf16)
# usage: bash benchmarks/front_door_gpu.sh tests|bench     (results under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/front-door-out}
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, av, torch, transformers; print(sys.version.split()[0], 'av', av.__version__, 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'cpus', __import__('os').cpu_count())"

if [ "$1" = tests ]; then
  VLSERVE_TEST_DEVICE=cuda timeout 560 python3 -m pytest -q -p no:cacheprovider -x tests/test_async_engine.py \
    tests/test_media_video.py tests/test_engine.py tests/test_front_door.py 2>&1 | tee "$OUT/tests.log" | tail -25
  exit
fi

python3 - <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from compare_hf import write_model_folder
write_model_folder("7b", Path("/tmp/qwen7b"))
EOF
run() {  # $1: label, $2: folder whose vlserve runs (the working directory puts it first on sys.path)
  (cd "$2" && PYTHONPATH="$PWD:/tmp/site" timeout 260 python3 "$OLDPWD/benchmarks/front_door.py" \
     --skip overhead --json "$OUT/front_door_$1.json") 2>&1 | grep -E "preprocess|health|overhead|Error"
  (cd "$2" && PYTHONPATH="$PWD:/tmp/site" timeout 280 python3 "$OLDPWD/benchmarks/front_door.py" /tmp/qwen7b \
     --skip preprocess health --num-prompts 128 --engine-flags "--load-format dummy --max-model-len 4096" \
     --json "$OUT/front_door_overhead_$1.json") 2>&1 | grep -E "preprocess|health|overhead|Error"
}
echo "== after (this checkout)"; run after .
echo "== before (.old)"; run before .old
