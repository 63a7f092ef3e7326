"""The nightly index job: build (or skip, or resume), verify, publish, smoke-query.

    python pipelines/nightly_build.py --model RUN_DIR --checkpoints CKPT_DIR --out IDX \
        [--smoke "head relation tail"] [--keep 3] [-- extra build options]

One log line per stage on stderr, ``<UTC time> nightly <stage> <status> <seconds>s <detail>``, and an
exit code a scheduler can act on:

    0  published a new build, or the index was already up to date
    2  bad input (a missing model, unknown labels, a diverged checkpoint): fix the input, do not retry
    3  another build of the same index is running: retry later
    4  the build or its verification failed (disk full, corrupt write): retry; a rerun resumes
    5  the smoke query failed on the published index

The build publishes only a complete build that passed ``verify_rows`` (checksums, done flags, rows,
values); this job then runs the full ``verify`` (fingerprints against the model files) and a smoke
query through the public API on what readers now see, and points ``LATEST`` back at the previous build
if either fails. Old builds beyond ``--keep`` are removed at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_INPUT, EXIT_BUSY, EXIT_BUILD, EXIT_SMOKE = 0, 2, 3, 4, 5


def log(stage: str, status: str, seconds: float, detail: str = "") -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} nightly {stage} {status} {seconds:.1f}s {detail}".rstrip(), file=sys.stderr, flush=True)


def tracin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracin_index.cli", *args], capture_output=True, text=True, check=False)


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pykeen run directory (or model file) to index")
    parser.add_argument("--checkpoints", default=None, help="directory of TracinCheckpoint files (TracInCP)")
    parser.add_argument("--out", type=Path, required=True, help="index directory (builds/ + LATEST)")
    parser.add_argument("--smoke", default=None, help='a "head relation tail" to query after publishing '
                        "(default: the first training triple)")
    parser.add_argument("--keep", type=int, default=3, help="complete builds to keep (gc)")
    parser.add_argument("build_args", nargs=argparse.REMAINDER, help="after --: more `tracin-index build` options")
    args = parser.parse_args(argv)
    extra = [a for a in args.build_args if a != "--"]

    latest = args.out / "LATEST"
    previous = latest.read_text() if latest.exists() else None

    def roll_back() -> str:
        """Point readers back at the build they had before tonight's (verify or smoke query failed)."""
        if previous is None or not latest.exists() or latest.read_text() == previous:
            return "nothing to roll back"
        from tracin_index.store import publish

        publish(args.out, args.out / "builds" / previous.strip())
        return f"readers rolled back to {previous.strip()}"

    t0 = time.perf_counter()
    cmd = ["build", "--model", args.model, "--out", str(args.out), *extra]
    if args.checkpoints:
        cmd += ["--checkpoints", args.checkpoints]
    res = tracin(*cmd)
    detail = last_line(res.stderr if res.returncode else (res.stdout or res.stderr))
    if res.returncode != 0:
        busy = "is being built by" in res.stderr
        log("build", "busy" if busy else "failed", time.perf_counter() - t0, detail)
        if busy:
            return EXIT_BUSY
        retryable = res.returncode != 2 or "no space left" in res.stderr or "failed its verification" in res.stderr
        return EXIT_BUILD if retryable else EXIT_INPUT  # exit 2 is a user error; anything else may pass on a rerun
    skipped = "is up to date" in res.stderr
    log("build", "skipped" if skipped else "ok", time.perf_counter() - t0, detail if not skipped else "unchanged inputs")

    t0 = time.perf_counter()
    res = tracin("verify", str(args.out))
    if res.returncode != 0:
        log("verify", "failed", time.perf_counter() - t0,
            f"{last_line(res.stderr) or last_line(res.stdout)}; {roll_back()}")
        return EXIT_BUILD
    log("verify", "ok", time.perf_counter() - t0, last_line(res.stdout))

    t0 = time.perf_counter()
    try:
        from tracin_index import backend, open_index

        backend.configure(allocator=True)  # this process serves the smoke query: the CLI's allocator tuning
        index = open_index(args.out)
        smoke = args.smoke or index.triples[0]
        [result] = index.query(smoke if isinstance(smoke, str) else smoke.reshape(1, 3), k=3)
        if not (result.proponents or result.opponents):
            raise RuntimeError("the smoke query returned no training triples")
        name = index.store.path.name
    except Exception as exc:  # any failure here means readers cannot use the index
        log("smoke-query", "failed", time.perf_counter() - t0,
            f"{type(exc).__name__}: {exc}".splitlines()[0] + f"; {roll_back()}")
        return EXIT_SMOKE
    log("smoke-query", "ok", time.perf_counter() - t0, f"build {name} serves queries")

    t0 = time.perf_counter()
    res = tracin("gc", str(args.out), "--keep", str(args.keep))
    log("gc", "ok" if res.returncode == 0 else "failed", time.perf_counter() - t0, last_line(res.stdout or res.stderr))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
