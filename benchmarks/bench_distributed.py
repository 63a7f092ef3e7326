"""Distributed build on a local Ray cluster: speedup with n workers, and the paper calculation for 100M triples.

Synthetic FB15k-237-shaped KG and ConvE d=200 (as ``bench_build.py``). Each worker is one Ray actor
with ``--threads-per-worker`` torch threads; the baseline is the same build in one process with the
same threads (no Ray). Every build's arrays are compared byte for byte with the baseline's. Then the
streaming search over the store is timed (bytes/s), and a 100M-triple graph is sized from the
measured per-worker build rate: build time on 8 and 64 workers, store size per k, query-node memory.

    python benchmarks/bench_distributed.py [--triples 20000] [--workers 1,2] [--threads-per-worker 1]
        [--rate TRIPLES_PER_S_PER_WORKER]   # e.g. a GPU's measured rate (bench_build.py on the GPU)
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_build import entities_for, synthetic_bundle


def array_bytes(build: Path) -> dict[str, bytes]:
    names = ("grads", "triples", "train_index", "self_influence", "norms", "done")
    return {str(f.relative_to(build)): f.read_bytes() for n in names for f in sorted((build / n).rglob("*")) if f.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triples", type=int, default=20000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--unit-rows", type=int, default=1024)
    parser.add_argument("--rate", type=float, default=None, help="per-worker triples/s for the paper calculation")
    args = parser.parse_args()
    logging.getLogger("pykeen").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        import ray
    except ImportError:
        sys.exit("bench_distributed.py needs Ray: pip install -e '.[ray]'")

    from tracin_index import BuildConfig, ProjectionSpec, build_index
    from tracin_index.distributed import ray_build
    from tracin_index.runtime import configure_threads
    from tracin_index.search import StreamSearcher
    from tracin_index.store import Store, resolve

    worker_counts = [int(w) for w in args.workers.split(",")]
    tpw = args.threads_per_worker
    config = BuildConfig(projection=ProjectionSpec("sparse", 1024, 0), unit_rows=args.unit_rows)
    rows: list[tuple[str, int, float, bool]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = synthetic_bundle(args.triples, entities_for(args.triples), 237, root)
        configure_threads(tpw, tune_allocator=True)
        t0 = time.perf_counter()
        build_index(bundle, root / "single", config=config)
        rows.append((f"one process, {tpw} thread(s), no Ray", 1, time.perf_counter() - t0, True))
        reference = array_bytes(Path(str(resolve(root / "single"))))
        ray.init(num_cpus=max(worker_counts) * tpw, include_dashboard=False, log_to_driver=False,
                 object_store_memory=500 * 2**20)
        try:
            for w in worker_counts:
                out = root / f"ray{w}"
                t0 = time.perf_counter()
                ray_build(bundle, out, config=config, workers=w, cpus_per_worker=tpw, shards=4 * w)
                rows.append((f"Ray, {w} worker(s) x {tpw} thread(s)", w, time.perf_counter() - t0,
                             array_bytes(Path(str(resolve(out)))) == reference))
        finally:
            ray.shutdown()

        configure_threads(len(os.sched_getaffinity(0)), tune_allocator=True)
        store = Store.open(root / "single")
        searcher = StreamSearcher(store, memory=64 * 2**20)
        q = np.random.default_rng(0).standard_normal((64, int(store.attrs["width"]))).astype(np.float32)
        searcher.search(q[:1], 10, 10)  # warm the page cache: the figure is the scan, not the disk
        t0 = time.perf_counter()
        searcher.search(q, 100, 500)
        stream_s = time.perf_counter() - t0
        grads_bytes = store.num_rows * int(store.attrs["width"]) * 2

    n = args.triples
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"workload: synthetic FB15k-237-shaped KG, {n:,} training triples, ConvE d=200 (inverse triples), last:2, "
          f"sparse k=1024, write units of {args.unit_rows} rows, 4 shards per worker\n")
    print("| setup | workers | wall s | triples/s | speedup vs 1 Ray worker | arrays equal the one-process build |")
    print("|---|---|---|---|---|---|")
    one = next(secs for name, w, secs, _ in rows if name.startswith("Ray") and w == 1) if 1 in worker_counts else rows[0][2]
    for name, w, secs, same in rows:
        print(f"| {name} | {w} | {secs:.1f} | {n / secs:,.0f} | {one / secs:.2f} | {'yes' if same else 'NO'} |")
    per_worker = args.rate or n / one
    source = "given (--rate)" if args.rate else "measured: one Ray worker above"
    print(f"\nstreaming exact search ({store.num_rows:,} rows x {store.attrs['width']} float16, page cache warm, "
          f"64 queries, 100 + 500 results): {stream_s:.2f} s = {grads_bytes / stream_s / 1e9:.2f} GB/s of rows\n")
    big = 100_000_000
    print(f"Paper calculation, {big:,} training triples, per-worker rate {per_worker:,.0f} triples/s ({source}):\n")
    print("| workers | build time (ideal, no stragglers) |")
    print("|---|---|")
    for w in (8, 64):
        h = big / (per_worker * w) / 3600
        print(f"| {w} | {h:,.1f} h |")
    bw = grads_bytes / stream_s
    print("\n| k | store (rows, float16) | + per-row arrays | in-memory flat index (float32) | streamed query, one batch "
          f"at {bw / 1e9:.2f} GB/s |")
    print("|---|---|---|---|---|")
    for k in (256, 512, 1024, 2048, 4096):
        rows_b = big * k * 2
        print(f"| {k} | {rows_b / 1e9:,.0f} GB | {big * 40 / 1e9:,.0f} GB | {2 * rows_b / 1e9:,.0f} GB | "
              f"{rows_b / bw / 60:,.1f} min |")
    print(f"\nQuery node memory with --search stream: the --memory block (e.g. 2 GB) + the per-row metadata it keeps "
          f"(triples, train_index, norms: {big * 36 / 1e9:.1f} GB at 100M rows) + the model.")


if __name__ == "__main__":
    main()
