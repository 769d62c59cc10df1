#!/usr/bin/env bash
# Source this file: it leaves $PY pointing at a Python that has routerlib and its needs.
#  - A machine whose python3 already has torch + triton with a CUDA GPU (e.g. torch 2.11 +
#    triton 3.6, no network): that Python is used as it is, routerlib from this checkout.
#  - Otherwise: a virtual environment in .venv with the CPU build of torch, triton (its
#    interpreter runs the kernels on the CPU: TRITON_INTERPRET=1) and the extras. The CPU torch
#    wheel comes from wherever pip already finds one (a local wheel or index in pip's config);
#    failing that from PyTorch's CPU index, never from PyPI's default Linux build, which pulls
#    ~3 GB of CUDA libraries. Tuning: ROUTERLIB_VENV, ROUTERLIB_TORCH (version),
#    ROUTERLIB_TORCH_INDEX (the CPU index), PYTHON (the interpreter that builds the venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROUTERLIB_VENV:-$ROOT/.venv}"
SYS_PY="${PYTHON:-python3}"
TORCH_VERSION="${ROUTERLIB_TORCH:-2.13.0}"
TORCH_CPU_INDEX="${ROUTERLIB_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
TRITON_SPEC="triton>=3.6,<3.10"  # tested: 3.6 (GPU machines), 3.9 (CI)

install_cpu_torch() {  # $1: the venv's python
  local py="$1" spec tmp
  case "$(uname -s)" in
    Darwin) spec="torch==$TORCH_VERSION" ;;  # macOS wheels are CPU builds
    *) spec="torch==$TORCH_VERSION+cpu" ;;   # the CPU build's local version label
  esac
  tmp=$(mktemp -d)
  if "$py" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$spec" >/dev/null 2>&1
  then
    echo "[env] $spec: found by pip's configured sources" >&2
    "$py" -m pip install -q "$spec"
  else
    echo "[env] $spec: from $TORCH_CPU_INDEX" >&2
    "$py" -m pip install -q "$spec" --extra-index-url "$TORCH_CPU_INDEX"
  fi
  rm -rf "$tmp"
}

if "$SYS_PY" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    2>/dev/null; then
  PY="$SYS_PY"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import routerlib, torch, triton, \
nbclient, hypothesis, mkdocs, transformers, playwright" 2>/dev/null; then
    echo "[env] building $VENV (CPU torch + triton interpreter)" >&2
    "$SYS_PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    install_cpu_torch "$VENV/bin/python"
    "$VENV/bin/python" -m pip install -q "$TRITON_SPEC"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[notebooks,dev,docs,hf,browser]"
  fi
  PY="$VENV/bin/python"
  # No GPU: Triton kernels run on the CPU through the interpreter.
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
  fi
fi
export PY
"$PY" - <<'PYEOF' >&2
import torch, triton, os
print(f"[env] python ok: torch {torch.__version__}, triton {triton.__version__}, "
      f"cuda={torch.cuda.is_available()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
PYEOF
