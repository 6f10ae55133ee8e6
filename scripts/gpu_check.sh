#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA host: the gpu-marked tests, the step benchmark on CUDA,
# and the end-to-end rounds with CUDA workers (bit-identical replicas against a CPU server).
# Writes logs and JSON under ${OUT:-gpu-out}. Wheels in .whl/ are installed first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 || cat "$out/install.log"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/device.txt"
python3 -c "import torch, grpc, google.protobuf as p; print(torch.__version__, torch.cuda.get_device_name(0), grpc.__version__, p.__version__)" | tee -a "$out/device.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/dept_model/test_train.py 2>&1 | tee "$out/gpu_tests.log"
[ -n "${GPU_SKIP_STEP:-}" ] || timeout 200 dept-bench step --json > "$out/step_cuda.json" 2> "$out/step_cuda.log"; echo "step rc=$?"; cat "$out/step_cuda.json"
DEPT_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests/e2e/test_rounds.py 2>&1 | tee "$out/e2e_cuda.log"
