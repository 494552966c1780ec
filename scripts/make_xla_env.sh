#!/usr/bin/env bash
# Build the virtual environment of the XLA test suite (tests/xla, marker `xla`): torch 2.9 + torch-xla 2.9 from
# PyPI, run on the CPU with PJRT_DEVICE=CPU. torch-xla 2.9 works only beside torch 2.9, and the x86_64 torch
# wheels on PyPI are CUDA builds: the environment is ~7.3 GB (4.3 GB of it nvidia-* runtime wheels), measured
# at ~3.5 minutes to download and install here. The CUDA wheels cannot be left out: torch 2.9 refuses to import
# without libcudart/libcublas even on a CPU-only machine.
#
# usage: bash scripts/make_xla_env.sh [VENV_DIR]        (default .venv-xla; an existing one is reused)
# then:  PJRT_DEVICE=CPU VENV_DIR/bin/python -m pytest tests/xla -q
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-.venv-xla}"
python_bin="${PYTHON:-python3.11}"
torch_version="2.9.0"
xla_version="2.9.0"

check() {
  PJRT_DEVICE=CPU "$venv/bin/python" - <<'PY'
import torch
import torch_xla

x = torch.ones(2, 2, device=torch_xla.device())
assert float((x @ x).sum().cpu()) == 8.0
print(f"torch {torch.__version__}, torch_xla {torch_xla.__version__}: XLA on CPU works")
PY
}

if [ -x "$venv/bin/python" ] && check 2>/dev/null; then
  # Refresh only the project (an editable install is cheap); torch and torch-xla are already right.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "xla env $venv already built"
  exit 0
fi

start=$(date +%s)
"$python_bin" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# A machine-wide pip constraint file may cap torch elsewhere; this environment pins its own versions.
export PIP_CONSTRAINT=""
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "torch==$torch_version" "torch-xla==$xla_version"
# The project and its test tools, without letting pip move torch.
"${pip[@]}" install -q --no-deps -e .
"${pip[@]}" install -q "torch==$torch_version" "pyyaml>=6" "omegaconf>=2.3" "numpy>=1.26" "pyarrow>=15" \
  "tokenizers>=0.19" "tqdm>=4.66" "safetensors>=0.4" "pytest>=8"
check
end=$(date +%s)
echo "xla env ready in $venv: $((end - start)) s, $(du -sh "$venv" | cut -f1)"
