#!/usr/bin/env bash
# The project's GPU check, for a machine with CUDA (at most ~5 minutes after the install):
#   bash bench/device_check.sh
# installs with the project's own files, runs the tests that need CUDA (they are skipped on CPU-only
# machines) and prints GPU ÷ CPU times of the steps that have a CUDA path (bench/bench_device.py).
set -euo pipefail
cd "$(dirname "$0")/.."
make install
PY=.venv/bin/python
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA device here')"
$PY -m pytest -q -rs tests/test_switch_thresholds.py::test_cuda_matches_cpu \
    tests/test_serving.py::test_server_on_cuda_gives_the_cpu_bytes tests/test_serving.py
$PY bench/bench_device.py
