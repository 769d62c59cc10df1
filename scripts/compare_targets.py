"""Before/after table of two targets runs (python -m routerlib.bench.targets ... --out PREFIX):
the triton rows both runs measured, their times and after / before. A row more than 5% slower
after is marked SLOWER (eager rows by the larger of median and wall time, as the targets judge
them).

    python scripts/compare_targets.py BEFORE.json AFTER.json
"""

from __future__ import annotations

import json
import sys


def _rows(path: str) -> dict[tuple, dict]:
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {(r["section"], r["case"], r["op"], r["impl"], r["mode"]): r for r in rows
            if r.get("status") == "ok" and r["impl"] == "triton"}


def _us(r: dict) -> float:
    if r["mode"] == "graph":
        return r["median_us"]
    return max(r["median_us"], r.get("wall_us") or 0.0)


def main(before: str, after: str) -> int:
    a, b = _rows(before), _rows(after)
    slower = 0
    print(f"{'section':<9}{'case':<18}{'op':<15}{'mode':<20}{'before us':>10}{'after us':>10}"
          f"{'after/before':>13}")
    for key in (k for k in b if k in a):
        x, y = _us(a[key]), _us(b[key])
        flag = "  SLOWER" if y > 1.05 * x else ""
        slower += bool(flag)
        print(f"{key[0]:<9}{key[1]:<18}{key[2]:<15}{key[4]:<20}{x:>10.2f}{y:>10.2f}"
              f"{y / x:>13.3f}{flag}")
    only = [k for k in b if k not in a]
    print(f"{slower} row(s) more than 5% slower; {len(only)} row(s) new in the after run")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
