"""End-to-end demo: train ConvE on Nations (ships with pykeen), index it, ask who influenced predictions.

Runs the real command line, as a user would:

    python pipelines/demo.py [--out demo-out] [--epochs 40]

1. ``pipeline(model="ConvE", dataset="Nations", ...)`` with LCWA + BCE and inverse triples (ConvE's
   usual setting); the ``TracinCheckpoint`` callback saves the model state and the learning rate in
   force at two epochs (TracInCP checkpoints); then ``save_to_directory``;
2. ``tracin-index build --checkpoints DIR`` over both checkpoints (last two layers, TensorSketch k=1024);
3. ``tracin-index info`` and ``tracin-index query`` for three test triples (a table, then JSON);
4. ``tracin-index score`` of the whole test set into Parquet, and ``tracin-index self-influence``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch


def train(out: Path, epochs: int) -> tuple[Path, Path, list[str]]:
    from pykeen.pipeline import pipeline

    from tracin_index.callbacks import TracinCheckpoint

    logging.getLogger("pykeen").setLevel(logging.ERROR)  # importing pykeen.training resets it to INFO
    logging.getLogger("torch_max_mem").setLevel(logging.ERROR)
    ckpt_dir = out / "checkpoints"
    save = TracinCheckpoint(ckpt_dir, epochs=[epochs // 2, epochs])

    result = pipeline(
        dataset="Nations",
        dataset_kwargs={"create_inverse_triples": True},
        model="ConvE",
        model_kwargs={"embedding_dim": 200, "output_channels": 32},
        training_loop="LCWA",
        loss="BCEAfterSigmoid",
        optimizer="Adam",
        optimizer_kwargs={"lr": 0.003},
        lr_scheduler="ExponentialLR",
        lr_scheduler_kwargs={"gamma": 0.97},
        training_kwargs={"num_epochs": epochs, "batch_size": 128, "callbacks": [save], "use_tqdm": False},
        evaluation_kwargs={"batch_size": 256, "use_tqdm": False},
        random_seed=0,
        device="cpu",
    )
    model_dir = out / "model"
    result.save_to_directory(model_dir)
    mrr = result.metric_results.get_metric("both.realistic.inverse_harmonic_mean_rank")
    hits10 = result.metric_results.get_metric("both.realistic.hits_at_10")
    print(f"trained ConvE on Nations for {epochs} epochs: test MRR {mrr:.3f}, Hits@10 {hits10:.3f}")
    from pykeen.datasets import Nations

    testing = Nations(create_inverse_triples=True).testing
    ent, rel = testing.entity_id_to_label, testing.relation_id_to_label
    labels = [f"{ent[h]}\t{rel[r]}\t{ent[t]}" for h, r, t in testing.mapped_triples[:3].tolist()]
    return model_dir, ckpt_dir, labels


def run(*args: str) -> None:
    cmd = [sys.executable, "-m", "tracin_index.cli", *args]
    print("$ tracin-index " + " ".join(f"'{a}'" if (" " in a or "\t" in a) else a for a in args).replace("\t", " "))
    sys.stdout.flush()
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    logging.getLogger("pykeen").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    started = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    model_dir, ckpt_dir, tests = train(args.out, args.epochs)
    t_train = time.perf_counter() - started

    index = args.out / "index"
    t0 = time.perf_counter()
    run("build", "--model", str(model_dir), "--checkpoints", str(ckpt_dir), "--out", str(index), "--layers", "last:2")
    t_build = time.perf_counter() - t0
    run("info", str(index))
    t0 = time.perf_counter()
    run("query", str(index), *[a for t in tests[:2] for a in ("--triple", t)], "--top-k", "5")
    t_query = time.perf_counter() - t0
    run("query", str(index), "--triple", tests[2], "--top-k", "3", "--json")
    run("query", str(index), "--triple", tests[0], "--top-k", "3", "--mode", "cosine", "--neighbourhood")
    t0 = time.perf_counter()
    run("score", str(index), "--test", "pykeen:nations", "--top-k", "10", "--out", str(args.out / "scores.parquet"))
    t_score = time.perf_counter() - t0
    import pandas as pd

    frame = pd.read_parquet(args.out / "scores.parquet")
    print(f"{len(frame):,} rows, columns: {', '.join(frame.columns)}")
    run("self-influence", str(index), "--top", "5")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s "
          f"(training {t_train:.0f} s, build {t_build:.1f} s, query of 2 triples {t_query:.1f} s, "
          f"scoring the {len(set(frame['test_index'])):,}-triple test set {t_score:.1f} s, each incl. start-up)")


if __name__ == "__main__":
    main()
