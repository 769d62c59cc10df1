#!/usr/bin/env bash
# Download the peers' wheels into .whl/ (git-ignored) for a GPU run that has no network:
# scripts/gpu_run.sh installs whatever lies there into /tmp/site. Needs a machine with PyPI and a
# Python that has torch (DeepSpeed's wheel is built here, without its C++ ops).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
python3 -m pip download -q --no-deps "${PLAT[@]}" -d .whl \
  torchtitan==0.3.0 spmd-types==0.2.3 tyro==1.0.16 docstring-parser==0.18.0 typeguard==4.6.0 \
  shtab==1.13.0 hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0
PY="$(cd "$(dirname "${PY:-.venv/bin/python}")" && pwd)/$(basename "${PY:-.venv/bin/python}")"
OUTDIR="$PWD/.whl"
( cd /tmp && DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation \
    deepspeed==0.19.8 -w "$OUTDIR" )
ls .whl
