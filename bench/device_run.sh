#!/usr/bin/env bash
# The one command for a lent GPU machine (torch installed, no registry): install the wheels that
# bench/prepare_device.py put in bench/device_wheels (carried with the working tree) into a folder of
# their own, offline and without dependency resolution (the folder holds the whole tested closure), then
# run bench/gpu_check.py. Its report goes to $OUT/gpu_check (bench/gpu_check when OUT is unset), rewritten
# as each part starts and ends, so whatever finished survives a time-out.
#
#     bash bench/device_run.sh                       # every part but the DAG (about 8 minutes on one GPU)
#     bash bench/device_run.sh --parts stages,sampling
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
wheels=${DEVICE_WHEELS:-bench/device_wheels}
site=${DEVICE_SITE:-/tmp/robustgen-site}
out=${OUT:-bench}/gpu_check
echo "device_run: $("$python" -V 2>&1), torch $("$python" -c 'import torch; print(torch.__version__)')," \
     "wheels prepared for: $(cat "$wheels/python-versions.txt")"
if [ ! -f "$site/.complete" ]; then
    "$python" -m pip install --quiet --no-index --no-deps --find-links "$wheels" --target "$site" \
        -r "$wheels/requirements.txt"
    touch "$site/.complete"
fi
PYTHONPATH="$site:$PWD" exec "$python" bench/gpu_check.py --out "$out" "$@"
