"""Build-time sampling: how much of the full index's top-10 does an index of a sample of the training set keep?

UMLS (clean, ships with pykeen), ConvE trained as in ``bench_self_influence.py`` (LCWA + BCEAfterSigmoid,
inverse triples, TracinCheckpoint saves), indexed in full and with ``BuildConfig(sample_rate=R,
stratify=..., sample_seed=...)``. A seeded set of test triples is queried (``index.query(test, k=10)``,
default candidates and exact re-rank) against every index. Columns:

- overlap with full: ``|sampled top-10 & full top-10| / |full top-10|`` (by training position), averaged
  over the test triples, for proponents and opponents;
- full top-10 sampled: the share of the full index's top-10 rows that are in the sample at all, the most
  a sampled index can recover (overlap equals it when the sample's own ranking is exact);
- within the sample: overlap of the sampled top-10 with brute-force exact influence (the full index's
  ``exact_influence``) restricted to the sampled rows: about 1.0, since the re-rank is exact.

    python benchmarks/bench_sampling.py [--epochs 30] [--dim 200] [--queries 100] [--seed 0]
                                        [--rates 0.05,0.1,0.2,0.5,1.0] [--model RUN_DIR --checkpoints-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_self_influence import quiet, train_conve


def overlap(got: Sequence[int], truth: Sequence[int]) -> float | None:
    """``|got & truth| / |truth|``; None when ``truth`` is empty (no such end for this test triple)."""
    return None if not truth else len(set(got) & set(truth)) / len(truth)


def mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else float("nan")


def exact_ends(values: np.ndarray, positions: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Brute force: top-``k`` positive and bottom-``k`` negative training positions of one test row."""
    order = np.argsort(-values, kind="stable")
    top = [int(positions[i]) for i in order[:k] if values[i] > 0]
    order = np.argsort(values, kind="stable")
    bottom = [int(positions[i]) for i in order[:k] if values[i] < 0]
    return top, bottom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--dim", type=int, default=200, help="ConvE embedding_dim (32 filters)")
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--checkpoints", type=int, default=2, help="evenly spaced TracinCheckpoint saves")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, the test triples and the samples")
    parser.add_argument("--queries", type=int, default=100, help="test triples queried")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rates", default="0.05,0.1,0.2,0.5,1.0")
    parser.add_argument("--model", type=Path, default=None, help="reuse a save_to_directory run instead of training")
    parser.add_argument("--checkpoints-dir", type=Path, default=None, help="its TracinCheckpoint directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the run and the indexes here")
    args = parser.parse_args()
    rates = sorted({float(r) for r in args.rates.split(",")} | {1.0})
    quiet()

    from pykeen.datasets import UMLS

    from tracin_index import BuildConfig, QueryResult, TracinIndex, build_index, load_model, open_index
    from tracin_index.callbacks import find_checkpoints
    from tracin_index.runtime import configure_threads

    quiet()
    configure_threads(args.threads, tune_allocator=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ds = UMLS(create_inverse_triples=True)
        if args.model is None:
            run = train_conve(ds.training, ds, root, epochs=args.epochs, dim=args.dim, lr=args.lr,
                              checkpoints=args.checkpoints, seed=args.seed)
            model_dir, ckpt_dir = run.directory, run.checkpoint_dir
            trained = f"ConvE d={args.dim}, 32 filters, {args.epochs} epochs, Adam lr {args.lr}, filtered test MRR {run.mrr:.3f}"
        else:
            model_dir, ckpt_dir = args.model, args.checkpoints_dir
            trained = f"model reused from {args.model}"
        bundle = load_model(model_dir)
        ckpts = find_checkpoints(ckpt_dir) if ckpt_dir is not None else []
        rng = np.random.default_rng(args.seed)
        testing = ds.testing.mapped_triples
        test = testing[torch.from_numpy(np.sort(rng.choice(len(testing), size=args.queries, replace=False)))]

        def build(rate: float, stratify: str) -> tuple[TracinIndex, float, float, list[QueryResult]]:
            out = root / f"idx_{rate:g}_{stratify}"
            t0 = time.perf_counter()
            build_index(bundle, out, checkpoints=ckpts, force=True,
                        config=BuildConfig(sample_rate=rate, stratify=stratify, sample_seed=args.seed))
            seconds = time.perf_counter() - t0
            index = open_index(out)
            t0 = time.perf_counter()
            results = index.query(test, k=args.k)
            return index, seconds, time.perf_counter() - t0, list(results)

        full, full_build, full_query, full_results = build(1.0, "relation")
        full_pro = [[p.train_index for p in r.proponents] for r in full_results]
        full_opp = [[o.train_index for o in r.opponents] for r in full_results]
        exact = full.exact_influence(test).double().numpy()  # (M, N) brute force; full rows are training positions
        rows = []
        for rate in rates:
            for stratify in ("relation", "none") if rate < 1.0 else ("all",):
                if rate < 1.0:
                    index, build_s, query_s, results = build(rate, stratify)
                else:
                    index, build_s, query_s, results = full, full_build, full_query, full_results
                sample = index.train_index
                in_sample = set(sample.tolist())
                stats: dict[str, list[float | None]] = {k: [] for k in ("pro", "opp", "bound_pro", "bound_opp",
                                                                         "within_pro", "within_opp")}
                for m, res in enumerate(results):
                    pro = [p.train_index for p in res.proponents]
                    opp = [o.train_index for o in res.opponents]
                    stats["pro"].append(overlap(pro, full_pro[m]))
                    stats["opp"].append(overlap(opp, full_opp[m]))
                    stats["bound_pro"].append(overlap([i for i in full_pro[m] if i in in_sample], full_pro[m]))
                    stats["bound_opp"].append(overlap([i for i in full_opp[m] if i in in_sample], full_opp[m]))
                    top, bottom = exact_ends(exact[m, sample], sample, args.k)
                    stats["within_pro"].append(overlap(pro, top))
                    stats["within_opp"].append(overlap(opp, bottom))
                rows.append((rate, stratify, len(sample), build_s, query_s, {k: mean(v) for k, v in stats.items()}))
        total = time.perf_counter() - started

    n = int(bundle.triples.mapped.shape[0])
    print(f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"workload: UMLS (clean), {n:,} training triples; {trained}; {max(1, len(ckpts))} checkpoint(s), last:2, "
          f"bce, sparse k=1024; {args.queries} seeded test triples, top-{args.k}, default candidates + exact re-rank; "
          f"total {total:.0f} s\n")
    print("| R | stratify | rows | build s | query s | pro overlap with full | opp overlap with full "
          "| full top-10 sampled (pro / opp) | pro within sample | opp within sample |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rate, stratify, num, build_s, query_s, s in rows:
        print(f"| {rate:g} | {stratify} | {num:,} | {build_s:.1f} | {query_s:.1f} | {s['pro']:.3f} | {s['opp']:.3f} "
              f"| {s['bound_pro']:.3f} / {s['bound_opp']:.3f} | {s['within_pro']:.3f} | {s['within_opp']:.3f} |")


if __name__ == "__main__":
    main()
