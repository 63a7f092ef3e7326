"""Query-side costs: ad-hoc latency (p50/p99), cold start, and bulk scoring next to FAISS's own search.

Synthetic FB15k-237-shaped KG and ConvE d=200 (as ``bench_build.py``), random test triples. Prints a
markdown table; nothing is downloaded.

    python benchmarks/bench_query.py [--triples 20000] [--queries 50] [--bulk 256] [--threads 2]

Rows:
- cold start: ``open_index`` (model load, rows read through their checksums, FAISS flat index) + first query;
- ad-hoc query: one test triple, top-10, default candidates, exact re-rank (p50 / p99 over ``--queries``);
- bulk scoring of ``--bulk`` test triples (batches of 64), next to the FAISS flat search alone for the
  same queries and candidate counts (both ends), and the test gradients alone.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_build import synthetic_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triples", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--bulk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("pykeen").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    from tracin_index import BuildConfig, build_index, open_index
    from tracin_index.runtime import configure_threads

    configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = synthetic_bundle(args.triples, 14541, 237, root)
        build_index(bundle, root / "idx", config=BuildConfig())
        gen = torch.Generator().manual_seed(1)
        m = max(args.queries, args.bulk)
        test = torch.stack([torch.randint(14541, (m,), generator=gen), torch.randint(237, (m,), generator=gen),
                            torch.randint(14541, (m,), generator=gen)], dim=1)

        started = time.perf_counter()
        index = open_index(root / "idx", model=bundle)
        opened = time.perf_counter() - started
        index.query(test[:1], k=10)
        cold = time.perf_counter() - started

        latencies = []
        for i in range(args.queries):
            t0 = time.perf_counter()
            index.query(test[i : i + 1], k=10)
            latencies.append(time.perf_counter() - t0)
        lat = np.array(latencies) * 1000

        bulk = test[: args.bulk]
        settings = index.settings(10)
        n_pro, n_opp = settings.per_end()
        t0 = time.perf_counter()
        q, _ = index.test_rows(bulk)
        t_grad = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.searcher.search(q, n_pro, n_opp)
        t_search = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.score(bulk, settings, batch_size=64)
        t_bulk = time.perf_counter() - t0

    print(f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"workload: synthetic FB15k-237-shaped KG, {args.triples:,} training triples, ConvE d=200 (inverse triples), "
          f"last:2, sparse k=1024, top-10, {n_pro} + {n_opp} candidates re-ranked\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| cold start: open_index | {opened:.2f} s |")
    print(f"| cold start: open_index + first query | {cold:.2f} s |")
    print(f"| ad-hoc query p50 / p99 ({args.queries} queries) | {np.percentile(lat, 50):.0f} / {np.percentile(lat, 99):.0f} ms |")
    print(f"| bulk scoring, {args.bulk} test triples | {t_bulk:.2f} s ({args.bulk / t_bulk:.1f} triples/s) |")
    print(f"| FAISS flat search alone, both ends | {t_search:.2f} s ({args.bulk / t_search:.1f} triples/s) |")
    print(f"| test gradients + projection alone | {t_grad:.2f} s |")
    print(f"| bulk / search-alone throughput | {t_search / t_bulk:.2f} (target >= 0.5) |")


if __name__ == "__main__":
    main()
