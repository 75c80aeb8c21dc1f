"""`make bench`: every benchmarks/bench_*.py with its defaults, one after another.

Each prints its own table and writes its CSV under benchmarks/results/. A benchmark whose
optional peer is not installed (TRL for bench_vs_trl) says how to install it and exits 2;
this script reports that and goes on. Exit status: 1 if any benchmark failed otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"\n=== {script.name}", flush=True)
        code = subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode
        if code == 2:
            print(f"--- {script.name}: skipped (a dependency is missing; see above)")
        elif code != 0:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
