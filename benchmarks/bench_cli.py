"""Start-up of the command line: ``tracin-index --help``, each command's ``--help`` and an argument error,
each in a fresh process (what a user waits for before anything runs), and ``import tracin_index``.

    python benchmarks/bench_cli.py [--repeats 5]

Prints a markdown table: median and slowest wall time over the repeats, and whether torch was imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = [
    ("tracin-index --help", ["--help"]),
    *[(f"tracin-index {c} --help", [c, "--help"]) for c in
      ("build", "query", "score", "self-influence", "run", "info", "verify", "finalize", "gc")],
    ("tracin-index build --loss hinge (argument error)", ["build", "--model", "m", "--out", "o", "--loss", "hinge"]),
]
PROBE = ("import sys, runpy\nsys.argv = ['tracin-index', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('tracin_index.cli', run_name='__main__')\n"
         "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)\n")


def timed(args: list[str]) -> tuple[float, bool]:
    start = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, out.stderr.strip().endswith("True")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [("python -c 'import tracin_index'", [sys.executable, "-c",
             "import sys, tracin_index; print('torch' in sys.modules, file=sys.stderr)"])]
    script = Path(sys.executable).parent / "tracin-index"
    if script.exists():  # the console script itself, as a user runs it
        rows.append(("tracin-index --help (console script)", [str(script), "--help"]))
    rows += [(name, [sys.executable, "-c", PROBE, *argv]) for name, argv in CASES]
    print("| command | median s | slowest s | imports torch |")
    print("|---|---|---|---|")
    for name, argv in rows:
        runs = [timed(argv) for _ in range(args.repeats)]
        times = [t for t, _ in runs]
        torch = "-" if "console script" in name else "yes" if runs[0][1] else "no"
        print(f"| `{name}` | {statistics.median(times):.3f} | {max(times):.3f} | {torch} |")


if __name__ == "__main__":
    main()
