#!/usr/bin/env bash
# mxd_torch's CUDA route on a GPU machine, in one command from the repo root (.ci/gpu-check's
# `torch` stage runs it): builds the extension with the Python that has a CUDA torch
# (PYTHON, default python3) and nvcc, then runs tests/torch/test_mxd_torch_cuda.py, where a
# skipped test is a failure (MXD_TORCH_EXPECT_CUDA=1, and nvidia-smi lists a GPU), the CPU
# suite test_mxd_torch.py with the same build, and the README's snippets with CUDA as torch's
# default device (test_readme.py --device cuda; a skip is a failure here too). Logs go to $OUT
# (default /tmp/mxd-gpu-out).
# Exit status: 0 when everything ran and passed.
#   e.g. run(command=".ci/gpu-check torch", carry=[".deps"])   (from the development machine)
#        tests/torch/gpu_check.sh                              (on the GPU machine itself)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/mxd-gpu-out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
lib=$PWD/build-gpu/torch-lib
export PATH=/usr/local/cuda/bin:$PATH
# Headers the GPU machine lacks (Eigen, nlohmann-json), unpacked from .deps by .ci/gpu-check.
deps=$PWD/.deps/root
if [ -d "$deps/usr/include" ]; then
  export EIGEN_INCLUDE_DIR=$deps/usr/include/eigen3 CPATH=$deps/usr/include${CPATH:+:$CPATH}
fi
# The compiler whose libstdc++ torch runs with. The GPU machine's CC/CXX name another GCC 13
# (/opt/gcc); a module it builds, loaded beside the system libstdc++, printed no numbers in its
# messages and crashed on the first message with one (2026-12-04). The system g++ builds one
# that passes.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi

$PYTHON -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'GPU', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT/torch_gpu_env.txt"
start=$(date +%s)
# Both translation units at once (the CPU half and the .cu); the visible GPU's architecture
# unless TORCH_CUDA_ARCH_LIST says otherwise.
(cd examples/torch && MXD_TORCH_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} MXD_INCLUDE_DIR=$PWD/../../include \
  $PYTHON setup.py build --build-base "$PWD/../../build-gpu/torch-setup" --build-lib "$lib") \
  > "$OUT/torch_build.log" 2>&1
rc=$?
echo "== mxd_torch build: rc=$rc in $(( $(date +%s) - start )) s"
grep "^mxd_torch:" "$OUT/torch_build.log"
if [ $rc -ne 0 ]; then tail -40 "$OUT/torch_build.log"; exit 1; fi

PYTHONPATH=$lib MXD_TORCH_EXPECT_CUDA=1 $PYTHON tests/torch/test_mxd_torch_cuda.py \
  > "$OUT/torch_cuda_tests.log" 2>&1
rc_gpu=$?
PYTHONPATH=$lib $PYTHON tests/torch/test_mxd_torch.py > "$OUT/torch_cpu_tests.log" 2>&1
rc_cpu=$?
PYTHONPATH=$lib $PYTHON tests/torch/test_readme.py --device cuda > "$OUT/torch_readme_cuda.log" 2>&1
rc_readme=$?
grep -E "^(FAIL|ERROR):|passed, .* failed|^skipped:" "$OUT/torch_cuda_tests.log" | head -40
grep -E "^(FAIL|ERROR):|passed, .* failed" "$OUT/torch_cpu_tests.log" | head -20
grep -E "FAILED|skipped:|passed, .* failed" "$OUT/torch_readme_cuda.log" | head -20
failed=0
[ $rc_gpu -eq 0 ] || { echo "FAILED: test_mxd_torch_cuda.py rc=$rc_gpu"; failed=1; }
[ $rc_cpu -eq 0 ] || { echo "FAILED: test_mxd_torch.py rc=$rc_cpu"; failed=1; }
[ $rc_readme -eq 0 ] || { echo "FAILED: test_readme.py --device cuda rc=$rc_readme"; failed=1; }
if grep -q "skipped:" "$OUT/torch_readme_cuda.log"; then
  echo "FAILED: README snippets skipped on the GPU (see torch_readme_cuda.log)"
  failed=1
fi
if grep -q "^skipped:" "$OUT/torch_cuda_tests.log"; then
  echo "FAILED: GPU tests skipped (see torch_cuda_tests.log): nothing was checked there"
  failed=1
fi
exit $failed
