#!/usr/bin/env bash
# The GPU checks, for whoever has a CUDA device: runs every test marked `gpu` (and the Triton kernel tests,
# compiled for the device instead of interpreted) and prints one summary line.
#   bash scripts/gpu_check.sh            (from the repository root, with llmq installed: pip install -e '.[test]')
set -uo pipefail
cd "$(dirname "$0")/.."
device=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')")
log=$(mktemp)
python -m pytest -m "gpu or triton" -n 0 -q -rfEs -p no:cacheprovider tests > "$log" 2>&1
status=$?
tail -n 40 "$log" >&2
summary=$(grep -E "^[0-9]+ (passed|failed|skipped|error)|(passed|failed|skipped|deselected)( in |,)" "$log" | tail -n 1)
echo "gpu_check: ${device}; torch $(python -c 'import torch; print(torch.__version__)'); ${summary:-no pytest summary}"
exit $status
