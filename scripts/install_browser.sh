#!/usr/bin/env bash
# Installs Debian's chromium for tests/test_browser.py when it is missing (idempotent: a no-op when
# /usr/bin/chromium exists). Playwright drives that binary (executable_path), so no browser is
# downloaded by playwright itself; its Python package comes with the dev extras.
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
  echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present)"
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install_browser.sh: not root and no sudo" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "chromium: $(/usr/bin/chromium --version)"
