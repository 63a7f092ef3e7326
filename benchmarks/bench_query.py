"""Query-side costs: ad-hoc latency (p50/p99), cold start, and bulk scoring next to FAISS's own search.

Synthetic FB15k-237-shaped KG and ConvE d=200 (as ``bench_build.py``), random test triples. Prints a
markdown table; nothing is downloaded.

    python benchmarks/bench_query.py [--triples 20000] [--queries 50] [--bulk 20466] [--threads 2] [--index DIR]
                                     [--device cuda]

``--index DIR`` keeps the built index there and reuses it on the next run (the synthetic model is
regenerated from its seed). Rows:
- cold start: ``open_index`` (model load, rows read through their checksums, search table) + first query;
- ad-hoc query: one test triple, top-10, default candidates, exact re-rank (p50 / p99 over ``--queries``),
  and where its time goes (test gradient, search, re-rank);
- bulk scoring of ``--bulk`` test triples with the default batch (``bulk_batch_size``), next to FAISS's
  flat search alone for the same queries, candidate counts and batch (both ends), our own scan alone,
  and the test gradients alone; peak RSS of the process.
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
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
    parser.add_argument("--bulk", type=int, default=20466)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--index", type=Path, default=None, help="keep (and reuse) the built index here")
    parser.add_argument("--search", default="auto", help="the search backend (auto, torch, full, faiss, stream)")
    parser.add_argument("--recall", action="store_true",
                        help="also: the int8 prefilter against the full scan and both against brute force, per ad-hoc query")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (build, test gradients, search and re-rank there)")
    args = parser.parse_args()
    logging.getLogger("pykeen").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    from tracin_index import BuildConfig, build_index, open_index
    from tracin_index.pairs import rerank
    from tracin_index.runtime import configure_threads
    from tracin_index.search import FaissSearcher, TorchSearcher, build_flat_index, flat_rows

    configure_threads(args.threads, tune_allocator=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = synthetic_bundle(args.triples, 14541, 237, root)
        where = args.index or root / "idx"
        if not (where / "LATEST").exists():
            build_index(bundle, where, config=BuildConfig(device=args.device))
        gen = torch.Generator().manual_seed(1)
        m = max(args.queries, args.bulk)
        test = torch.stack([torch.randint(14541, (m,), generator=gen), torch.randint(237, (m,), generator=gen),
                            torch.randint(14541, (m,), generator=gen)], dim=1)

        started = time.perf_counter()
        index = open_index(where, model=bundle, device=args.device, search=args.search)
        opened = time.perf_counter() - started
        index.query(test[:1], k=10)
        cold = time.perf_counter() - started
        t0 = time.perf_counter()
        if isinstance(index.searcher, TorchSearcher):
            index.searcher.wait()  # the background int8 pack: ad-hoc latencies below are the steady state
        packed = time.perf_counter() - t0

        settings = index.settings(10)
        n_pro, n_opp = settings.per_end()
        latencies, parts = [], np.zeros(3)
        for i in range(args.queries):
            one = test[i : i + 1]
            t0 = time.perf_counter()
            index.query(one, k=10)
            latencies.append(time.perf_counter() - t0)
            with torch.no_grad():  # the same query again, stage by stage
                t0 = time.perf_counter()
                q, ts, blocks = index._queries(one, settings, keep_blocks=True)
                t1 = time.perf_counter()
                _, pi, _, oi = index.searcher.search(q, n_pro, n_opp)
                t2 = time.perf_counter()
                rerank(index.tracer, index.triples, blocks, pi, oi, ts, None, index._acts)
                parts += [t1 - t0, t2 - t1, time.perf_counter() - t2]
        lat = np.array(latencies) * 1000
        parts = parts / args.queries * 1000
        recall_rows = []
        if args.recall and isinstance(index.searcher, TorchSearcher) and args.device == "cpu":
            probe = test[: args.queries]
            runs = {}
            prefilter = index.searcher.prefilter
            for pre in (True, False):
                index.searcher.prefilter = pre
                runs[pre] = [index.query(probe[i : i + 1], k=10)[0] for i in range(len(probe))]
            index.searcher.prefilter = prefilter
            t0 = time.perf_counter()
            exact = index.exact_influence(probe)  # (Q, N): brute force over every row
            t_exact = time.perf_counter() - t0
            same = np.zeros(2)
            hits = {True: np.zeros(2), False: np.zeros(2)}
            wanted = np.zeros(2)
            for i in range(len(probe)):
                order = torch.argsort(exact[i], descending=True)
                top = {int(j) for j in order[:10] if exact[i, j] > 0}
                bottom = {int(j) for j in order.flip(0)[:10] if exact[i, j] < 0}
                wanted += [len(top), len(bottom)]
                ends = {c: ([p.train_index for p in r[i].proponents], [o.train_index for o in r[i].opponents])
                        for c, r in runs.items()}
                same += [ends[True][0] == ends[False][0], ends[True][1] == ends[False][1]]
                for c in (True, False):
                    hits[c] += [len(top & set(ends[c][0])), len(bottom & set(ends[c][1]))]
            nq = len(probe)
            recall_rows = [
                f"| int8 prefilter vs full scan: identical top-10 lists, proponents / opponents ({nq} queries) | "
                f"{same[0] / nq:.3f} / {same[1] / nq:.3f} |",
                f"| recall@10 against brute force (exact over all rows, {t_exact:.0f} s), full scan (--search full, "
                f"auto's choice: {not prefilter}): pro / opp | "
                f"{hits[False][0] / wanted[0]:.3f} / {hits[False][1] / wanted[1]:.3f} |",
                f"| recall@10 against brute force, int8 prefilter (auto's choice: {prefilter}): pro / opp | "
                f"{hits[True][0] / wanted[0]:.3f} / {hits[True][1] / wanted[1]:.3f} |",
            ]

        bulk = test[: args.bulk]
        if not len(bulk):
            print("\n| measure | value |\n|---|---|")
            print(f"| cold start: open_index + first query | {cold:.2f} s |")
            print(f"| then waited for the background int8 pack | {packed:.2f} s |")
            print(f"| ad-hoc query p50 / p99 ({args.queries} queries) | {np.percentile(lat, 50):.0f} / "
                  f"{np.percentile(lat, 99):.0f} ms |")
            print(f"| ad-hoc mean split: test gradient / search / exact re-rank | {parts[0]:.0f} / {parts[1]:.0f} / "
                  f"{parts[2]:.0f} ms |")
            print("\n".join(recall_rows))
            return
        batch = index.bulk_batch_size(len(bulk), settings)
        t0 = time.perf_counter()
        index.score(bulk, settings)
        t_bulk = time.perf_counter() - t0
        t0 = time.perf_counter()
        queries = np.concatenate([index.test_rows(bulk[b : b + batch])[0] for b in range(0, len(bulk), batch)])
        t_grad = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in range(0, len(bulk), batch):
            index.searcher.search(queries[b : b + batch], n_pro, n_opp)
        t_scan = time.perf_counter() - t0
        flat = build_flat_index(index.store)
        faiss_searcher = FaissSearcher(flat, flat_rows(flat))
        t0 = time.perf_counter()
        for b in range(0, len(bulk), batch):
            faiss_searcher.search(queries[b : b + batch], n_pro, n_opp)
        t_faiss = time.perf_counter() - t0

    n = args.bulk
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"\nmachine: {platform.processor() or platform.machine()}{gpu}, {args.threads} threads, torch {torch.__version__}")
    print(f"workload: synthetic FB15k-237-shaped KG, {args.triples:,} training triples, ConvE d=200 (inverse triples), "
          f"last:2, sparse k=1024, top-10, {n_pro} + {n_opp} candidates re-ranked; search backend "
          f"{index.searcher.backend}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| cold start: open_index | {opened:.2f} s |")
    print(f"| cold start: open_index + first query | {cold:.2f} s |")
    print(f"| then waited for the background int8 pack | {packed:.2f} s |")
    print(f"| ad-hoc query p50 / p99 ({args.queries} queries) | {np.percentile(lat, 50):.0f} / {np.percentile(lat, 99):.0f} ms |")
    print(f"| ad-hoc mean split: test gradient / search / exact re-rank | {parts[0]:.0f} / {parts[1]:.0f} / {parts[2]:.0f} ms |")
    if recall_rows:
        print("\n".join(recall_rows))
    print(f"| bulk scoring, {n:,} test triples (batches of {batch:,}) | {t_bulk:.1f} s ({n / t_bulk:.1f} triples/s) |")
    print(f"| FAISS flat search alone, both ends, same batches | {t_faiss:.1f} s ({n / t_faiss:.1f} triples/s) |")
    print(f"| our scan alone, both ends, same batches | {t_scan:.1f} s ({n / t_scan:.1f} triples/s) |")
    print(f"| test gradients + projection alone | {t_grad:.1f} s |")
    print(f"| bulk / FAISS-search-alone throughput | {t_faiss / t_bulk:.2f} (target >= 0.5) |")
    print(f"| bulk / our-scan-alone throughput | {t_scan / t_bulk:.2f} |")
    print(f"| peak RSS of the process | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB |")


if __name__ == "__main__":
    main()
