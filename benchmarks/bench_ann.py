"""Queries through the build's FAISS index (``build --faiss``) at 1M-5M rows: cold start, latency, peak RSS,
bulk throughput, and top-10 recall of both ends against brute force, over ``nprobe`` and the code size.

Synthetic KG and ConvE d=200 as ``bench_build.py --series`` (one entity per 18.7 triples from 272k), sparse
projection (k by default: 2048 from 1M rows), one checkpoint. Prints markdown tables; nothing is downloaded.

    python benchmarks/bench_ann.py --triples 1000000 --workdir /tmp/ann1m [--dim auto] [--faiss auto]
        [--also IVF1024,SQ8] [--nprobe 8,16,32,64] [--queries 50] [--recall 30] [--bulk 2000] [--scan]
        [--threads 2]

Stages, each in a fresh process so that the query process's peak RSS is its own:
1. the build, with ``--faiss`` (kept in ``--workdir`` and reused), and each ``--also`` index made from the
   same stored rows (kept beside it);
2. brute force: the exact influence of the ``--recall`` probe triples on every row (kept: a pass over all
   rows' gradients);
3. the query process: ``open_index(search="ann")`` and the first answer (cold start), ``--queries`` ad-hoc
   queries (p50 / p99), bulk scoring of ``--bulk`` triples, peak RSS; then, per index and ``nprobe``, the
   latency and the recall of the probe triples' top-10 proponents and opponents; with ``--scan``, the same for
   the exact scan of the float32 rows (the search below 1M rows), where they fit in memory; and, per index and
   ``nprobe``, the recall of each end against the number of candidates searched for it.

Recall: the share of the brute-force top-10 (positive values for proponents, negative for opponents) that the
query lists, after its exact re-rank of the candidates (400 proponents, 2,000 opponents: the default with a
FAISS index, four times the exact scan's; the ``--scan`` row uses the scan's own 100 and 500).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_build import entities_for, peak_rss_mb, synthetic_bundle

RELATIONS = 237


def probe_triples(n: int, m: int, seed: int) -> torch.Tensor:
    """``m`` random test triples over the synthetic KG of ``n`` triples."""
    gen = torch.Generator().manual_seed(seed)
    e = entities_for(n)
    return torch.stack([torch.randint(e, (m,), generator=gen), torch.randint(RELATIONS, (m,), generator=gen),
                        torch.randint(e, (m,), generator=gen)], dim=1)


def spec_file(work: Path, spec: str) -> Path:
    return work / f"faiss-{spec.replace(',', '_')}.bin"


def stage_build(args: argparse.Namespace) -> dict[str, Any]:
    from tracin_index import BuildConfig, build_index
    from tracin_index.ann import build_faiss
    from tracin_index.projection import ProjectionSpec
    from tracin_index.store import Store

    work, out = args.workdir, {}
    bundle = synthetic_bundle(args.triples, entities_for(args.triples), RELATIONS, work)
    if not (work / "idx" / "LATEST").exists():
        t0 = time.perf_counter()
        build_index(bundle, work / "idx", config=BuildConfig(faiss=args.faiss, faiss_sample=args.sample,
                                                             projection=ProjectionSpec(dim=args.dim)))
        out["build_s"] = time.perf_counter() - t0
    store = Store.open(work / "idx")
    dim, spec = store.attrs["projection"]["dim"], store.attrs["faiss"]["spec"]
    if args.dim not in (None, dim) or args.faiss not in ("auto", spec):
        sys.exit(f"{work}'s build projects to {dim} with FAISS {spec}, not --dim {args.dim} --faiss {args.faiss}; "
                 "use another --workdir")
    out["dim"], out["spec"] = dim, spec
    out["faiss_s"] = float(store.attrs["timings"].get("faiss_s", float("nan")))
    out["faiss_bytes"] = int(store.attrs["faiss"]["bytes"])
    out["store_gb"] = sum(f.stat().st_size for f in (work / "idx").rglob("*") if f.is_file()) / 1e9
    for spec in args.also:
        path = spec_file(work, spec)
        if not path.exists():
            t0 = time.perf_counter()
            path.write_bytes(build_faiss(store, spec, args.sample, seed=0)[1])
            out[f"also_s:{spec}"] = time.perf_counter() - t0
    out["rss_mb"] = peak_rss_mb()
    return out


def stage_exact(args: argparse.Namespace) -> dict[str, Any]:
    from tracin_index import open_index

    path = args.workdir / f"exact-{args.recall}.npz"
    if path.exists():
        return {"exact_s": float(np.load(path)["seconds"])}
    bundle = synthetic_bundle(args.triples, entities_for(args.triples), RELATIONS, args.workdir)
    index = open_index(args.workdir / "idx", model=bundle, search="ann")  # codes only: the rows are not loaded
    probe = probe_triples(args.triples, args.recall, seed=2)
    t0 = time.perf_counter()
    exact = index.exact_influence(probe).numpy()  # (Q, N)
    seconds = time.perf_counter() - t0
    order = np.argsort(-exact, axis=1, kind="stable")
    top, bottom = order[:, :10], order[:, ::-1][:, :10]
    np.savez(path, top=index.train_index[top], bottom=index.train_index[bottom],
             top_v=np.take_along_axis(exact, top, 1), bottom_v=np.take_along_axis(exact, bottom, 1), seconds=seconds)
    return {"exact_s": seconds}


def _share(listed: list[tuple[set[int], set[int]]], truth: Any) -> tuple[float, float]:
    """Recall@10 of each end: the share of the brute-force top-10 (positive values for proponents, negative for
    opponents) inside each probe's ``listed`` (proponent rows, opponent rows)."""
    hits, wanted = np.zeros(2), np.zeros(2)
    for i, ends in enumerate(listed):
        for e, (key, sign) in enumerate((("top", 1), ("bottom", -1))):
            want = {int(t) for t, v in zip(truth[key][i], truth[f"{key}_v"][i], strict=True) if sign * v > 0}
            wanted[e] += len(want)
            hits[e] += len(want & ends[e])
    return float(hits[0] / max(1, wanted[0])), float(hits[1] / max(1, wanted[1]))


def _recall(results: Any, truth: Any) -> tuple[float, float]:
    return _share([({p.train_index for p in r.proponents}, {o.train_index for o in r.opponents}) for r in results], truth)


CURVE = (400, 1000, 2000, 4000, 8000, 16000)  # candidates per end of the recall curve


def _curve(faiss_index: Any, q: np.ndarray, train_index: np.ndarray, truth: Any) -> tuple[list[float], list[float]]:
    """Recall@10 of each end against the candidates searched for it (an exact re-rank keeps every true top-10
    row among its candidates): the share of the brute-force top-10 inside the top ``c`` of ``q`` and ``-q``."""
    from tracin_index.search import both_ends

    _, pi, _, oi = both_ends(faiss_index, q, CURVE[-1], CURVE[-1])

    def rows(ids: np.ndarray) -> set[int]:
        return set(train_index[ids[ids >= 0]].tolist())

    shares = [_share([(rows(pi[j, :c]), rows(oi[j, :c])) for j in range(len(q))], truth) for c in CURVE]
    return [p for p, _ in shares], [o for _, o in shares]


def _timed(index: Any, triples: torch.Tensor) -> tuple[list[Any], np.ndarray]:
    results, lat = [], []
    for i in range(len(triples)):
        t0 = time.perf_counter()
        results.append(index.query(triples[i : i + 1], k=10)[0])
        lat.append(time.perf_counter() - t0)
    return results, np.array(lat) * 1000


def stage_query(args: argparse.Namespace) -> dict[str, Any]:
    from tracin_index import open_index
    from tracin_index.ann import AnnSearcher, set_search_parameter
    from tracin_index.runtime import faiss_module
    from tracin_index.search import TorchSearcher

    bundle = synthetic_bundle(args.triples, entities_for(args.triples), RELATIONS, args.workdir)
    test = probe_triples(args.triples, args.queries + args.bulk, seed=1)
    out: dict[str, Any] = {"rss_model_mb": peak_rss_mb()}
    t0 = time.perf_counter()
    index = open_index(args.workdir / "idx", model=bundle, search="ann", nprobe=args.nprobe[0])
    out["open_s"] = time.perf_counter() - t0
    index.query(test[:1], k=10)
    out["cold_s"] = time.perf_counter() - t0
    _, lat = _timed(index, test[: args.queries])
    out["p50_ms"], out["p99_ms"] = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
    out["candidates"] = list(index.settings(10).per_end())
    if args.bulk:
        t0 = time.perf_counter()
        index.score(test[args.queries :])
        out["bulk_per_s"] = args.bulk / (time.perf_counter() - t0)
    out["rss_mb"] = peak_rss_mb()

    truth = np.load(args.workdir / f"exact-{args.recall}.npz")
    probe = probe_triples(args.triples, args.recall, seed=2)
    faiss = faiss_module()
    assert isinstance(index.searcher, AnnSearcher)
    fallback = index.searcher.fallback
    rows, curves = [], []
    q_rows = index.test_rows(probe)[0]
    built = index.store.attrs["faiss"]["spec"]
    for spec in [built, *args.also]:
        if spec != built:
            data = np.frombuffer(spec_file(args.workdir, spec).read_bytes(), dtype=np.uint8)
            index.searcher = AnnSearcher(faiss.deserialize_index(data), fallback)
        for nprobe in args.nprobe:
            searcher = index.searcher
            assert isinstance(searcher, AnnSearcher)
            searcher.nprobe = set_search_parameter(searcher.index, nprobe)
            pro_c, opp_c = _curve(searcher.index, q_rows, index.train_index, truth)
            curves.append({"spec": spec, "nprobe": searcher.nprobe, "pro": pro_c, "opp": opp_c})
            results, lat = _timed(index, probe)
            pro, opp = _recall(results, truth)
            rows.append({"spec": spec, "nprobe": searcher.nprobe, "code_bytes": int(searcher.index.sa_code_size()),
                         "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                         "recall_pro": pro, "recall_opp": opp})
    if args.scan:  # the exact scan of the float32 rows (int8 prefilter) on the same probe, where it fits
        del index
        index = open_index(args.workdir / "idx", model=bundle, search="torch")
        if isinstance(index.searcher, TorchSearcher):
            index.searcher.wait()  # the background int8 layout: the steady state
        results, lat = _timed(index, probe)
        pro, opp = _recall(results, truth)
        rows.append({"spec": "exact scan (search torch: float32 rows, int8 prefilter)", "nprobe": "-",
                     "code_bytes": 4 * index.searcher.width + index.searcher.width,
                     "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                     "recall_pro": pro, "recall_opp": opp})
    out["table"], out["curves"] = rows, curves
    return out


def run_stage(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--stage", stage, "--triples", str(args.triples), "--workdir", str(args.workdir),
           "--faiss", args.faiss, "--dim", str(args.dim or "auto"), "--sample", str(args.sample),
           "--nprobe", ",".join(map(str, args.nprobe)),
           "--queries", str(args.queries), "--recall", str(args.recall), "--bulk", str(args.bulk),
           "--threads", str(args.threads)]
    if args.also:
        cmd += ["--also", ";".join(args.also)]
    if args.scan:
        cmd.append("--scan")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_ann: stage {stage} failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triples", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, required=True, help="the model, index and brute force, reused")
    parser.add_argument("--faiss", default="auto", help="the build's index_factory string (auto: the build's default)")
    parser.add_argument("--also", type=lambda s: [x for x in s.split(";") if x], default=[],
                        help="other index_factory strings compared on the same rows, ';'-separated")
    parser.add_argument("--dim", type=lambda v: None if v == "auto" else int(v), default=None,
                        help="the projection's dimension k (auto: the build's default)")
    parser.add_argument("--sample", type=int, default=65536, help="rows the FAISS index is trained on")
    parser.add_argument("--nprobe", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64],
                        help="comma-separated; the first is the one of the latency, bulk and RSS rows")
    parser.add_argument("--queries", type=int, default=50, help="ad-hoc queries timed")
    parser.add_argument("--recall", type=int, default=30, help="probe triples of the recall table")
    parser.add_argument("--bulk", type=int, default=2000, help="test triples scored in bulk (0: none)")
    parser.add_argument("--scan", action="store_true",
                        help="also the exact scan (float32 rows in memory) on the recall probe, where they fit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stage", choices=["build", "exact", "query"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("pykeen").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    if args.stage:
        from tracin_index.runtime import configure_threads

        configure_threads(args.threads, tune_allocator=True)
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = {"build": stage_build, "exact": stage_exact, "query": stage_query}[args.stage](args)
        print(json.dumps(result))
        return

    b = run_stage("build", args)
    e = run_stage("exact", args)
    q = run_stage("query", args)
    n = args.triples
    print(f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"workload: synthetic FB15k-237-shaped KG, {n:,} training triples ({entities_for(n):,} entities), ConvE "
          f"d=200, inverse triples, last:2, sparse k={b['dim']}, top-10, {q['candidates'][0]} + {q['candidates'][1]} "
          "candidates re-ranked exactly; "
          f"build --faiss {b['spec']} (trained on {min(args.sample, n):,} rows)\n")
    print("| measure | value |\n|---|---|")
    if "build_s" in b:
        print(f"| build with the FAISS index | {b['build_s']:.0f} s (of which FAISS {b['faiss_s']:.0f} s) |")
    else:
        print(f"| FAISS index in the build (reused build) | {b['faiss_s']:.0f} s |")
    print(f"| store on disk / FAISS index in it | {b['store_gb']:.2f} GB / {b['faiss_bytes'] / 1e9:.2f} GB |")
    print(f"| cold start: open_index + first query (model already built) | {q['cold_s']:.2f} s (open {q['open_s']:.2f} s) |")
    print(f"| ad-hoc query p50 / p99 ({args.queries} queries, nprobe {args.nprobe[0]}) | "
          f"{q['p50_ms']:.0f} / {q['p99_ms']:.0f} ms |")
    if args.bulk:
        print(f"| bulk scoring, {args.bulk:,} test triples | {q['bulk_per_s']:.1f} triples/s |")
    print(f"| peak RSS of the query process (the model alone: {q['rss_model_mb']:,.0f} MB) | {q['rss_mb']:,.0f} MB |")
    print(f"| brute force for the recall ({args.recall} triples, exact over all rows) | {e['exact_s']:.0f} s |")
    print("\n| index | nprobe | code bytes/row | p50 / p99 ms | recall@10 proponents | recall@10 opponents |")
    print("|---|---|---|---|---|---|")
    for r in q["table"]:
        print(f"| {r['spec']} | {r['nprobe']} | {r['code_bytes']} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} | "
              f"{r['recall_pro']:.3f} | {r['recall_opp']:.3f} |")
    print("\nRecall@10 pro / opp against the candidates searched per end (the exact re-rank keeps every true "
          "top-10 row among them):\n")
    print("| index | nprobe | " + " | ".join(f"{c:,}" for c in CURVE) + " |")
    print("|---|---|" + "---|" * len(CURVE))
    for c in q["curves"]:
        cells = " | ".join(f"{p:.3f} / {o:.3f}" for p, o in zip(c["pro"], c["opp"], strict=True))
        print(f"| {c['spec']} | {c['nprobe']} | {cells} |")


if __name__ == "__main__":
    main()
