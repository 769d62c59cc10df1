#!/usr/bin/env bash
# The main job: execute the notebooks in order and write the report under build/report/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/env.sh
"$PY" -m routerlib.report "$@"
