#!/usr/bin/env bash
# Source this file: it leaves $PY pointing at a Python that has routerlib and its needs.
#  - A machine whose python3 already has torch+triton with a CUDA GPU (the lent H100s: no
#    network): reuse that Python as it is, routerlib from this checkout via PYTHONPATH.
#  - Otherwise: a virtual environment in .venv with the CPU build of torch (2.13.0, a wheel on
#    this workplace's disk), triton from PyPI (run under TRITON_INTERPRET=1), and the extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROUTERLIB_VENV:-$ROOT/.venv}"
SYS_PY="${PYTHON:-python3}"

if "$SYS_PY" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    2>/dev/null; then
  PY="$SYS_PY"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import routerlib, torch, triton, \
nbclient, hypothesis" 2>/dev/null; then
    echo "[env] building $VENV (CPU torch + triton interpreter)" >&2
    "$SYS_PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "torch==${ROUTERLIB_TORCH:-2.13.0}" "triton>=3.6"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[notebooks,dev]"
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
