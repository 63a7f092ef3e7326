"""Accuracy vs cost of the projection: which projection, k and candidate counts to default to.

UMLS (clean, ships with pykeen), ConvE trained as in ``bench_sampling.py`` (d=200, 32 filters, LCWA +
BCEAfterSigmoid, inverse triples, Adam with ExponentialLR, ``--num-checkpoints`` TracinCheckpoint saves), or a
saved run (``--model RUN_DIR --checkpoints DIR``). For every projection in ``--projections`` and k in ``--ks`` the
full training set is indexed (``last:2``, bce, ``force=True``) and a seeded set of ``--queries`` test triples is
queried. Tables:

1. per (projection, k): build seconds and training triples/s, bytes of the published build directory
   (``tracin_index.store.resolve``), and top-10 recall of proponents and opponents against brute force
   (``index.exact_influence`` over every row; exact top-10 positive / bottom-10 negative), (a) without re-rank
   (the projected top-10: ``rerank=False``, 10 candidates per end) and (b) with the exact re-rank at the default
   candidate counts (``default_candidates(10)``). Recall = ``|returned & exact| / |exact|``, averaged over the
   test triples whose exact list is non-empty. Builds whose estimated time exceeds ``--max-build-seconds`` are
   skipped (the estimate: the last measured full build of that projection scaled by ``k / k_prev``, or before
   the first, a probe build of a sample that fills one batch, at ``dim=min(k, 256)``, scaled by
   ``(N / batch) * (k / dim)``. The gaussian cost is linear in k and the sparse one less than linear; on a shared
   VM the probe's estimate can be well off either way, so leave a margin).
2. per ``--sweep`` config (default ``sparse:1024`` and ``auto``, the best other built config: highest mean
   re-rank recall at the defaults, then highest mean recall without re-rank, then fastest build), for every
   proponent candidate count in ``--sweep-pro`` x opponent count in ``--sweep-opp`` (top-10, exact re-rank):
   recall per end over all the test triples (an end's recall depends only on its own candidate count: the ends
   are searched apart and re-ranked by exact values, so it is measured once per count, in batches), and the
   median and p90 latency of ad-hoc queries, one ``index.query`` call per test triple, over a seeded subset of
   ``--latency-queries`` of them (the index already open and warmed up).

    python benchmarks/bench_accuracy.py [--projections sparse,gaussian] [--ks 256,512,1024,2048,4096]
        [--queries 100] [--max-build-seconds 300] [--sweep sparse:1024,auto] [--sweep-pro 20,50,100,200]
        [--sweep-opp 50,100,200,500,1000] [--model RUN_DIR --checkpoints DIR] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import exact_ends, mean, overlap
from bench_self_influence import quiet, train_conve

PROBE_DIM = 256  # probes build at dim=min(k, PROBE_DIM) and are scaled by k / dim


@dataclass
class Config:
    """One (projection, k) row of the first table; ``build_s`` None means skipped."""

    kind: str
    k: int
    estimate: float | None = None
    build_s: float | None = None
    size: int = 0
    query_s: float = 0.0
    plain: tuple[float, float] = (math.nan, math.nan)
    rerank: tuple[float, float] = (math.nan, math.nan)
    path: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.k}"


@dataclass
class SweepRow:
    pro: int
    opp: int
    recall: tuple[float, float]
    latencies: list[float] = field(default_factory=list)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        return f"{model}, {cores} cores, {mem:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        return f"{model}, {cores} cores"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def recall(results: Any, truth: list[tuple[list[int], list[int]]]) -> tuple[float, float]:
    """Mean top-k recall of proponents and of opponents (test triples with an empty exact list not counted)."""
    pro = [overlap([p.train_index for p in r.proponents], truth[m][0]) for m, r in enumerate(results)]
    opp = [overlap([o.train_index for o in r.opponents], truth[m][1]) for m, r in enumerate(results)]
    return mean(pro), mean(opp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--projections", default="sparse,gaussian")
    parser.add_argument("--ks", default="256,512,1024,2048,4096", help="projection dimensions")
    parser.add_argument("--queries", type=int, default=100, help="seeded UMLS test triples queried")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--max-build-seconds", type=float, default=300.0,
                        help="skip a build whose estimated time exceeds this")
    parser.add_argument("--sweep", default="sparse:1024,auto",
                        help="configs for the candidate sweep (KIND:K, or auto = the best other built config); '' for none")
    parser.add_argument("--sweep-pro", default="20,50,100,200", help="proponent candidate counts of the sweep")
    parser.add_argument("--sweep-opp", default="50,100,200,500,1000", help="opponent candidate counts of the sweep")
    parser.add_argument("--latency-queries", type=int, default=20,
                        help="test triples (a seeded subset of --queries) timed one by one per sweep cell")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--dim", type=int, default=200, help="ConvE embedding_dim (32 filters)")
    parser.add_argument("--lr", type=float, default=0.005, help="Adam's initial lr (ExponentialLR, gamma 0.99)")
    parser.add_argument("--num-checkpoints", type=int, default=2, help="evenly spaced TracinCheckpoint saves")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, the test triples and the projections")
    parser.add_argument("--model", type=Path, default=None, help="reuse a save_to_directory run instead of training")
    parser.add_argument("--checkpoints", type=Path, default=None, help="its TracinCheckpoint directory (with --model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the run and the indexes here")
    args = parser.parse_args()
    command = shlex.join(["python", *sys.argv])
    projections = [p.strip() for p in args.projections.split(",") if p.strip()]
    ks = sorted(set(ints(args.ks)))
    sweep_pro, sweep_opp = ints(args.sweep_pro), ints(args.sweep_opp)
    quiet()

    from pykeen.datasets import UMLS

    from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model, open_index
    from tracin_index.callbacks import find_checkpoints
    from tracin_index.query import default_candidates
    from tracin_index.runtime import configure_threads
    from tracin_index.store import resolve

    quiet()  # again: pykeen's modules are imported now
    threads = configure_threads(args.threads, tune_allocator=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ds = UMLS(create_inverse_triples=True)
        if args.model is None:
            log(f"training ConvE on UMLS for {args.epochs} epochs ...")
            run = train_conve(ds.training, ds, root, epochs=args.epochs, dim=args.dim, lr=args.lr,
                              checkpoints=args.num_checkpoints, seed=args.seed)
            model_dir, ckpt_dir = run.directory, run.checkpoint_dir
            trained = (f"ConvE d={args.dim}, 32 filters, LCWA + BCEAfterSigmoid, inverse triples, Adam lr {args.lr} "
                       f"(ExponentialLR 0.99), {args.epochs} epochs, filtered test MRR {run.mrr:.3f} "
                       f"(trained in {run.seconds:.0f} s)")
        else:
            model_dir, ckpt_dir = args.model, args.checkpoints
            trained = f"model reused from {args.model}"
            try:
                metrics = json.loads((args.model / "results.json").read_text())["metrics"]
                trained += f", filtered test MRR {metrics['both']['realistic']['inverse_harmonic_mean_rank']:.3f}"
            except (OSError, KeyError, ValueError):
                pass
        bundle = load_model(model_dir)
        ckpts = find_checkpoints(ckpt_dir) if ckpt_dir is not None else []
        n_train = int(bundle.triples.mapped.shape[0])
        rng = np.random.default_rng(args.seed)
        testing = ds.testing.mapped_triples
        test = testing[torch.from_numpy(np.sort(rng.choice(len(testing), size=args.queries, replace=False)))]
        top = args.top_k
        default_pro, default_opp = default_candidates(top)
        batch_size = BuildConfig().batch_size

        def build(kind: str, k: int, out: Path, sample: int | None = None) -> float:
            rate = 1.0 if sample is None else min(1.0, sample / n_train)
            config = BuildConfig(projection=ProjectionSpec(kind=kind, dim=k, seed=args.seed), sample_rate=rate,
                                 stratify="none", sample_seed=args.seed)
            t0 = time.perf_counter()
            build_index(bundle, out, checkpoints=ckpts, config=config, force=True)
            return time.perf_counter() - t0

        measured: dict[str, tuple[int, float]] = {}  # kind -> (k, seconds) of its last full build
        probed: dict[str, tuple[int, float]] = {}  # kind -> (probe dim, estimated full-build seconds at that dim)
        notes: list[str] = []

        def estimate(kind: str, k: int) -> float:
            if kind in measured:
                k0, t0 = measured[kind]
                return t0 * k / k0
            if kind not in probed:  # one build of a sample that fills one batch, scaled to the full set
                dim, n = min(k, PROBE_DIM), min(batch_size, n_train)
                t = build(kind, dim, root / f"probe_{kind}", n)
                probed[kind] = (dim, t * n_train / n)
                notes.append(f"probe {kind} dim {dim}: {n} triples (one batch) in {t:.1f} s -> est. "
                             f"{probed[kind][1]:.0f} s for {n_train:,} at dim {dim}, times k / {dim} above it")
                log("  " + notes[-1])
            dim, full = probed[kind]
            return full * k / dim

        configs: list[Config] = []
        truth: list[tuple[list[int], list[int]]] | None = None
        for kind in projections:
            for k in ks:
                c = Config(kind, k, estimate=estimate(kind, k))
                configs.append(c)
                assert c.estimate is not None
                if c.estimate > args.max_build_seconds:
                    log(f"{c.name}: skipped (est. {c.estimate:.0f} s > --max-build-seconds {args.max_build_seconds:g})")
                    continue
                log(f"{c.name}: building (est. {c.estimate:.0f} s) ...")
                c.path = root / f"idx_{kind}_{k}"
                c.build_s = build(kind, k, c.path)
                measured[kind] = (k, c.build_s)
                c.size = dir_bytes(Path(str(resolve(c.path))))
                index = open_index(c.path, model=bundle)
                if truth is None:  # brute force over every row; the exact values do not depend on the projection
                    exact = index.exact_influence(test).double().numpy()
                    truth = [exact_ends(exact[m], index.train_index, top) for m in range(len(test))]
                c.plain = recall(index.query(test, k=top, candidates=top, opponent_candidates=top, rerank=False), truth)
                t0 = time.perf_counter()
                c.rerank = recall(index.query(test, k=top), truth)
                c.query_s = time.perf_counter() - t0
                log(f"  built in {c.build_s:.1f} s; recall plain {c.plain[0]:.3f}/{c.plain[1]:.3f}, "
                    f"re-rank {c.rerank[0]:.3f}/{c.rerank[1]:.3f}")
                del index

        built = [c for c in configs if c.build_s is not None]
        chosen: list[Config] = []
        for name in [s.strip() for s in args.sweep.split(",") if s.strip()]:
            if name == "auto":
                others = [c for c in built if c not in chosen]
                if others:
                    chosen.append(max(others, key=lambda c: (round(float(np.mean(c.rerank)), 3),
                                                             round(float(np.mean(c.plain)), 3), -(c.build_s or 0.0))))
                continue
            match = [c for c in built if c.name == name]
            if not match:
                log(f"sweep {name}: not built here; left out")
            elif match[0] not in chosen:
                chosen.append(match[0])

        sweeps: list[tuple[Config, list[SweepRow]]] = []
        lat_pick = np.sort(rng.permutation(len(test))[: max(1, min(args.latency_queries, len(test)))])
        lat_test = test[torch.from_numpy(lat_pick)]
        for c in chosen:
            assert c.path is not None and truth is not None
            log(f"sweep {c.name} ...")
            index = open_index(c.path, model=bundle)
            # Recall of one end depends only on that end's candidate count (the ends are searched apart and
            # re-ranked by exact values), so it is measured per end, on all the test triples in batches.
            pro_recall = {n: recall(index.query(test, k=top, candidates=n, opponent_candidates=min(sweep_opp)),
                                    truth)[0] for n in sweep_pro}
            opp_recall = {n: recall(index.query(test, k=top, candidates=min(sweep_pro), opponent_candidates=n),
                                    truth)[1] for n in sweep_opp}
            index.query(lat_test[:1], k=top)  # warm-up
            rows = []
            for n_pro, n_opp in itertools.product(sweep_pro, sweep_opp):
                lat = []
                for m in range(len(lat_test)):  # ad-hoc: one test triple per call
                    t0 = time.perf_counter()
                    index.query(lat_test[m : m + 1], k=top, candidates=n_pro, opponent_candidates=n_opp)
                    lat.append(time.perf_counter() - t0)
                rows.append(SweepRow(n_pro, n_opp, (pro_recall[n_pro], opp_recall[n_opp]), lat))
            sweeps.append((c, rows))
            del index
        total = time.perf_counter() - started

    n_pro_counted = sum(1 for t in truth or [] if t[0])
    n_opp_counted = sum(1 for t in truth or [] if t[1])
    print(f"\nmachine: {machine()}; torch {torch.__version__}, {threads} threads; "
          f"date {datetime.date.today().isoformat()}; total {total:.0f} s")
    print(f"workload: UMLS (clean), {n_train:,} training triples; {trained}; {max(1, len(ckpts))} checkpoint(s), "
          f"last:2, bce; {args.queries} seeded test triples (seed {args.seed}), top-{top}; exact = brute force over "
          f"all {n_train:,} rows ({n_pro_counted} / {n_opp_counted} test triples have a non-empty exact proponent / "
          f"opponent list)")
    print(f"command: `{command}`\n")
    print(f"| projection | k | build s | triples/s | store bytes | pro recall, no re-rank | opp recall, no re-rank "
          f"| pro recall, re-rank {default_pro} | opp recall, re-rank {default_opp} | query s ({args.queries} tests) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in configs:
        if c.build_s is None:
            print(f"| {c.kind} | {c.k} | skipped (est. {c.estimate:.0f} s) | - | - | - | - | - | - | - |")
            continue
        print(f"| {c.kind} | {c.k} | {c.build_s:.1f} | {n_train / c.build_s:,.0f} | {c.size:,} | {c.plain[0]:.3f} "
              f"| {c.plain[1]:.3f} | {c.rerank[0]:.3f} | {c.rerank[1]:.3f} | {c.query_s:.1f} |")
    for c, rows in sweeps:
        print(f"\nCandidate sweep, {c.name} (top-{top}, exact re-rank): recall per end over the {args.queries} test "
              f"triples; latency of one `index.query` call with one test triple, over {len(lat_test)} of them\n")
        print("| pro candidates | opp candidates | pro recall | opp recall | latency p50 ms | latency p90 ms |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            ms = 1e3 * np.asarray(r.latencies)
            print(f"| {r.pro} | {r.opp} | {r.recall[0]:.3f} | {r.recall[1]:.3f} | {np.median(ms):.1f} "
                  f"| {np.percentile(ms, 90):.1f} |")
    if notes:
        print("\nBuild-time estimates: " + "; ".join(notes))


if __name__ == "__main__":
    main()
