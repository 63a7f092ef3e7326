"""Index build time next to the floor: one eval-mode forward pass (score_hrt) over the same triples.

Synthetic KG shaped like FB15k-237 (237 relations; 14,541 entities up to 272k triples, then one
entity per 18.7 triples, FB15k-237's ratio), ConvE at pykeen's defaults (d=200, 32 filters: a
10368x200 Linear), random-initialised. Prints markdown tables; nothing is downloaded.

    python benchmarks/bench_build.py [--triples 20000] [--no-inverse] [--batch-size 1024] [--threads 2]
                                     [--device cuda] [--projection sparse|gaussian]
    python benchmarks/bench_build.py --series 10000,100000,1000000 [--plot benchmarks/scaling.png]

One run: both floors (N rows; 2N rows, as inverse triples score every triple in both directions),
the build, where its time goes (forward+backward through the tracked layers, projection, Zarr
writes, search table at open), peak RSS. ``--series`` runs each N in a fresh process (so peak
RSS is per N), adds the ad-hoc query latency at each N, prints the scaling table and plots it.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch


def entities_for(n: int) -> int:
    return max(14541, round(n / 18.7))


def synthetic_bundle(n: int, entities: int, relations: int, root: Path, inverse: bool = True):  # type: ignore[no-untyped-def]
    from pykeen.models import ConvE
    from pykeen.triples import CoreTriplesFactory

    from tracin_index.model import ModelBundle, TriplesData

    gen = torch.Generator().manual_seed(0)
    mapped = torch.stack([torch.randint(entities, (n,), generator=gen), torch.randint(relations, (n,), generator=gen),
                          torch.randint(entities, (n,), generator=gen)], dim=1)
    tf = CoreTriplesFactory.create(mapped_triples=mapped, num_entities=entities, num_relations=relations,
                                   create_inverse_triples=inverse)
    model = ConvE(triples_factory=tf, embedding_dim=200, output_channels=32, random_seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    path = root / "model.pt"
    torch.save(model, path)
    data = TriplesData(mapped=mapped, entity_labels=[f"e{i}" for i in range(entities)],
                       relation_labels=[f"r{i}" for i in range(relations)])
    return ModelBundle(model=model, triples=data, source={"path": str(path), "kind": "module"})


def forward_floor(model, mapped: torch.Tensor, batch_size: int, both_directions: bool,  # type: ignore[no-untyped-def]
                  device: torch.device | None = None) -> float:
    from tracin_index.layers import internal_rows

    device = device or torch.device("cpu")
    model.to(device)
    started = time.perf_counter()
    with torch.no_grad():
        for s in range(0, mapped.shape[0], batch_size):
            rows, _ = internal_rows(model, mapped[s : s + batch_size].to(device))
            model.score_hrt(rows if both_directions else rows[: min(batch_size, mapped.shape[0] - s)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_run(n: int, batch_size: int, dim: int, inverse: bool, floor_rows: int, queries: int, device: str = "cpu",
            kind: str = "sparse") -> dict[str, Any]:
    """Build the index of ``n`` synthetic triples; every figure of one row of the tables."""
    from tracin_index import BuildConfig, ProjectionSpec, build_index, open_index
    from tracin_index.search import TorchSearcher, make_searcher
    from tracin_index.store import Store

    out: dict[str, Any] = {"n": n, "rss_start_mb": peak_rss_mb()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = synthetic_bundle(n, entities_for(n), 237, root, inverse)
        mapped = bundle.triples.mapped
        m = min(n, floor_rows)  # floors are linear in N: measured on a prefix, scaled to N
        dev = torch.device(device)
        forward_floor(bundle.model, mapped[:2048], batch_size, True, dev)  # warm-up
        out["floor_1_s"] = forward_floor(bundle.model, mapped[:m], batch_size, False, dev) * n / m
        out["floor_2_s"] = (forward_floor(bundle.model, mapped[:m], batch_size, True, dev) * n / m if inverse
                            else out["floor_1_s"])
        out["rss_model_mb"] = peak_rss_mb()
        config = BuildConfig(projection=ProjectionSpec(kind, dim, 0), batch_size=batch_size, device=device)
        t0 = time.perf_counter()
        store = build_index(bundle, root / "idx", config=config)
        out["build_s"] = time.perf_counter() - t0
        out["rss_build_mb"] = peak_rss_mb()
        out.update({k: float(v) for k, v in store.attrs["timings"].items()})
        out["store_mb"] = sum(f.stat().st_size for f in (root / "idx").rglob("*") if f.is_file()) / 2**20
        t0 = time.perf_counter()
        searcher = make_searcher(Store.open(root / "idx"), dev)  # what open_index holds: auto
        out["faiss_s"] = time.perf_counter() - t0
        out["backend"] = searcher.backend
        if isinstance(searcher, TorchSearcher):
            searcher.close()  # its background int8 layout would compete with the queries below
        del searcher
        if out["backend"] == "stream":
            queries = min(queries, 5)  # each streamed query reads the whole store
        if queries:
            t0 = time.perf_counter()
            index = open_index(root / "idx", model=bundle, device=device)
            gen = torch.Generator().manual_seed(1)
            test = torch.stack([torch.randint(entities_for(n), (queries,), generator=gen),
                                torch.randint(237, (queries,), generator=gen),
                                torch.randint(entities_for(n), (queries,), generator=gen)], dim=1)
            index.query(test[:1], k=10)
            out["cold_s"] = time.perf_counter() - t0
            if isinstance(index.searcher, TorchSearcher):
                index.searcher.wait()  # the latencies below are the steady state, after the background int8 layout
            lat = []
            for i in range(queries):
                t1 = time.perf_counter()
                index.query(test[i : i + 1], k=10)
                lat.append(time.perf_counter() - t1)
            out["query_p50_ms"] = float(np.percentile(lat, 50) * 1000)
            out["query_p99_ms"] = float(np.percentile(lat, 99) * 1000)
            out["rss_query_mb"] = peak_rss_mb()
    return out


def print_run(r: dict[str, Any], inverse: bool, dim: int, kind: str = "sparse") -> None:
    n, f1, f2 = r["n"], r["floor_1_s"], r["floor_2_s"]
    print("| step | seconds | triples/s | x floor (N rows) | x floor (2N rows) |")
    print("|---|---|---|---|---|")
    steps = [("forward score_hrt, N rows (floor)", f1)]
    if inverse:
        steps.append(("forward score_hrt, 2N rows (both directions)", f2))
    steps += [(f"build, {kind} k={dim}: write units (gradients + projection + Zarr)", r["units_s"]),
              (f"build, {kind} k={dim}: total (incl. verify, publish)", r["build_s"])]
    for name, secs in steps:
        print(f"| {name} | {secs:.2f} | {n / secs:,.0f} | {secs / f1:.2f} | {secs / f2:.2f} |")
    print("\nWhere the build's time goes (Zarr writes overlap the next unit's compute; only the wait counts):\n")
    print("| part | seconds | share of build |")
    print("|---|---|---|")
    other = r["build_s"] - r["gradients_s"] - r["projection_s"] - r["zarr_wait_s"] - r["verify_s"]
    for name, secs in [("forward + backward through the tracked layers", r["gradients_s"]),
                       (f"projection ({'sparse TensorSketch' if kind == 'sparse' else 'gaussian'})", r["projection_s"]),
                       ("Zarr writes, waited for (overlapped total: {:.2f} s)".format(r["zarr_write_s"]), r["zarr_wait_s"]),
                       ("verify (re-reads every row through its checksum)", r["verify_s"]),
                       ("other (checks, store creation, publish)", other),
                       ("search table, built at open (not part of the build)", r["faiss_s"])]:
        print(f"| {name} | {secs:.2f} | {secs / r['build_s']:.1%} |")
    print(f"\npeak RSS: {r['rss_build_mb']:,.0f} MB after the build ({r['rss_model_mb']:,.0f} MB before it); "
          f"store {r['store_mb']:,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--no-inverse", action="store_true", help="a ConvE without inverse triples (one row per triple)")
    parser.add_argument("--floor-rows", type=int, default=200000, help="floors are timed on at most this many triples")
    parser.add_argument("--queries", type=int, default=0, help="ad-hoc queries timed after the build (series: 20)")
    parser.add_argument("--series", help="comma-separated N, each run in a fresh process")
    parser.add_argument("--plot", help="with --series: write the scaling plot here (PNG)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the floors, the build and the queries run there")
    parser.add_argument("--projection", default="sparse", choices=("sparse", "gaussian"))
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("pykeen").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from tracin_index.runtime import configure_threads

    configure_threads(args.threads, tune_allocator=True)
    inverse = not args.no_inverse
    header = (f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
              f"ConvE d=200 ({'inverse triples' if inverse else 'no inverse triples'}), batch {args.batch_size}, "
              f"last:2 layers, {args.projection} k={args.dim}, device {args.device}")
    if args.series:
        results = []
        for n in [int(x) for x in args.series.split(",")]:
            cmd = [sys.executable, __file__, "--triples", str(n), "--json", "--queries", str(args.queries or 20),
                   "--threads", str(args.threads), "--dim", str(args.dim), "--batch-size", str(args.batch_size),
                   "--floor-rows", str(args.floor_rows), "--device", args.device, "--projection", args.projection,
                   ] + (["--no-inverse"] if args.no_inverse else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"done N={n:,}", file=sys.stderr)
        print(f"\n{header}\n")
        print("| N | entities | build s | triples/s | x floor (2N rows) | forward+backward s | projection s | Zarr wait s "
              "| peak RSS MB | store MB | search table s (backend) | cold start s | query p50 / p99 ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['n']:,} | {entities_for(r['n']):,} | {r['build_s']:.1f} | {r['n'] / r['build_s']:,.0f} | "
                  f"{r['build_s'] / r['floor_2_s']:.2f} | {r['gradients_s']:.1f} | {r['projection_s']:.1f} | "
                  f"{r['zarr_wait_s']:.1f} | {r['rss_build_mb']:,.0f} | {r['store_mb']:,.0f} | "
                  f"{r['faiss_s']:.1f} ({r.get('backend', '-')}) | "
                  f"{r['cold_s']:.1f} | {r['query_p50_ms']:.0f} / {r['query_p99_ms']:.0f} |")
        if args.plot:
            plot(results, args.plot)
        return
    r = one_run(args.triples, args.batch_size, args.dim, inverse, args.floor_rows, args.queries, args.device,
                args.projection)
    if args.json:
        print(json.dumps(r))
        return
    print(f"\n{header}; {args.triples:,} training triples\n")
    print_run(r, inverse, args.dim, args.projection)


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r["n"] for r in results])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.loglog(n, [r["build_s"] for r in results], "o-", label="build")
    a.loglog(n, [r["floor_2_s"] for r in results], "s--", label="forward floor (2N rows)")
    a.loglog(n, n * results[0]["build_s"] / n[0], ":", color="grey", label="linear in N")
    a.set_xlabel("training triples N")
    a.set_ylabel("seconds")
    a.set_title("index build")
    a.legend()
    b.loglog(n, [r["query_p50_ms"] for r in results], "o-", label="p50")  # log: ms in RAM, seconds streamed
    b.loglog(n, [r["query_p99_ms"] for r in results], "s--", label="p99")
    b.axhline(50, color="grey", linestyle=":", label="50 ms")
    b.set_xlabel("training triples N")
    b.set_ylabel("ms")
    b.set_title("ad-hoc query (top-10, exact re-rank; 5M: streamed)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
