"""Where a result was measured: device, versions, commit, host, date (one flat dict)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
import sys

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", _REPO, *args], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit of HEAD, dirty) of the repo routerlib is imported from; (None, None) outside git.
    Dirty counts changes to tracked files only (untracked results files do not make it dirty)."""
    if os.environ.get("ROUTERLIB_GIT_COMMIT"):
        # the GPU machines get a copy of the tree whose .git (if any) may be stale: the caller
        # says which commit it is
        return os.environ["ROUTERLIB_GIT_COMMIT"], None
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def env_info() -> dict[str, object]:
    """device (GPU name or CPU model), device_type, device_count, torch, triton, python, cuda,
    git_commit, git_dirty, hostname, date (UTC ISO 8601)."""
    cuda = torch.cuda.is_available()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_state()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else _cpu_model(),
        "device_type": "cuda" if cuda else "cpu",
        "device_count": torch.cuda.device_count() if cuda else 1,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(env_info(), indent=1))
