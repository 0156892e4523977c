# Sourced by the *_gpu.sh scripts on the device machine: the wheels in .whl/ installed under /tmp/site (no index,
# no network there), $OUT made, and the card and versions printed for the record.
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1  # this checkout, then the wheels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, av, torch, transformers; print(sys.version.split()[0], 'av', av.__version__, 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'cpus', __import__('os').cpu_count())"
