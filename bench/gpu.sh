#!/usr/bin/env bash
# The GPU check, one device call of at most 9 minutes: installs what the GPU machine lacks from
# .gpu-wheels/ (built here by ../shared/gpu/wheelhouse.sh and carried), then runs bench/gpu.py,
# which prints a table and writes $OUT/gpu.json.
#   run(command="bench/gpu.sh", carry=[".gpu-wheels"], timeout_s=560)
# Arguments go to bench/gpu.py (e.g. --models resnet50 --expect 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu-wheels ] && ! python3 -c "import snakemake" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PATH="$(python3 -c 'import sys, os; print(os.path.dirname(sys.executable))'):$PATH"
exec python3 bench/gpu.py --out "${OUT:-.}" --work "${WORK:-/tmp/snakembed-gpu}" "$@"
