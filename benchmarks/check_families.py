"""Every PyKEEN model family, as a new user would try it: train on Nations, build, query, compare with autograd.

For each family of pykeen's model resolver that trains on a plain triples dataset: train on Nations (LCWA +
BCEWithLogits, Adam, ``--epochs`` epochs, ``embedding_dim=--dim``), then for ``--layers last:2`` (sparse k=1024)
and ``all`` (``--projection none``): build the index, query two test triples (top-10, exact re-rank), and compare
every reported influence and ``exact_influence`` over 40 training triples with a plain one-triple-at-a-time
``torch.autograd.grad`` loop over the tracked parameters. Each family runs in its own process, so a traceback or a
kill shows as such. Prints a markdown table (what ``last:2`` tracks, its form, and each setting's status).

    python benchmarks/check_families.py [--epochs 3] [--dim 32] [--only conve,rgcn] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SKIPPED = {
    "complexliteral": "needs numeric literals",
    "distmultliteral": "needs numeric literals",
    "distmultliteralgated": "needs numeric literals",
    "inductivenodepiece": "inductive: needs an inference graph",
    "inductivenodepiecegnn": "inductive: needs an inference graph",
    "fixed": "no parameter enters the score",
}
KWARGS: dict[str, dict[str, Any]] = {
    "conve": {"output_channels": 8},
    "convkb": {"num_filters": 4},
    "ntn": {"num_slices": 2},
}
INVERSE = {"compgcn", "nodepiece", "conve"}


def reference(model: Any, names: list[str], triples: Any, loss: str) -> Any:
    """One triple at a time, plain ``torch.autograd.grad`` over the named parameters, flattened ``(N, D)``."""
    import torch
    import torch.nn.functional as F

    from tracin_index.layers import fresh_representations, internal_rows

    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    tracked = [params[n] for n in names]
    for p in tracked:
        p.requires_grad_(True)
    rows = []
    for i in range(triples.shape[0]):
        batch, _ = internal_rows(model, triples[i : i + 1])
        fresh_representations(model)
        value = F.softplus(-model.score_hrt(batch)).sum() if loss == "bce" else -model.score_hrt(batch).sum()
        grads = torch.autograd.grad(value, tracked, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, tracked, strict=True)]))
    for p in tracked:
        p.requires_grad_(False)
    return torch.stack(rows).detach()


def one_family(name: str, epochs: int, dim: int, root: Path) -> dict[str, Any]:
    import logging
    import warnings

    import numpy as np
    import torch

    logging.getLogger("pykeen").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from pykeen.datasets import Nations
    from pykeen.models import model_resolver
    from pykeen.training import LCWATrainingLoop
    from pykeen.triples import TriplesFactory

    from tracin_index import BuildConfig, ProjectionSpec, TracinError, build_index, load_model, open_index
    from tracin_index.runtime import configure_threads

    configure_threads(2, tune_allocator=True)
    ds = Nations(create_inverse_triples=name in INVERSE)
    tf = ds.training
    torch.manual_seed(0)
    model = model_resolver.make(name, {"embedding_dim": dim, **KWARGS.get(name, {}), "loss": "BCEWithLogits"},
                                triples_factory=tf, random_seed=0)
    LCWATrainingLoop(model=model, triples_factory=tf, optimizer="Adam", optimizer_kwargs={"lr": 0.01}).train(
        triples_factory=tf, num_epochs=epochs, batch_size=256, use_tqdm=False)
    out = root / name
    out.mkdir(parents=True)
    torch.save(model, out / "trained_model.pkl")
    TriplesFactory(mapped_triples=tf.mapped_triples, entity_to_id=tf.entity_to_id, relation_to_id=tf.relation_to_id,
                   create_inverse_triples=name in INVERSE).to_path_binary(out / "training_triples")
    test = ds.testing.mapped_triples[:2]
    result: dict[str, Any] = {"family": name}
    for layers, projection in (("last:2", "sparse"), ("all", "none")):
        bundle = load_model(out)
        started = time.perf_counter()
        try:
            store = build_index(bundle, root / f"{name}-{layers}", config=BuildConfig(
                layers=layers, projection=ProjectionSpec(projection)))
            index = open_index(root / f"{name}-{layers}")
        except TracinError as exc:
            result[layers] = {"status": "refused", "message": str(exc)}
            continue
        attrs = store.attrs
        names = [p["name"] for p in attrs["tracked"]]
        per_triple = set(attrs["plan"]["per_triple"])
        result[layers] = {"tracked": [(p["name"], "per-triple" if p["name"] in per_triple else p["kind"])
                                      for p in attrs["tracked"]], "warnings": attrs["warnings"]}
        sample = torch.from_numpy(np.sort(np.random.default_rng(0).choice(len(tf.mapped_triples), 40, replace=False)))
        ref_model = load_model(out).model
        ref_test = reference(ref_model, names, test, "bce")
        ref_train = reference(ref_model, names, bundle.triples.mapped[sample], "bce")
        want = ref_test @ ref_train.T
        bound = float(ref_test.norm(dim=1).max() * ref_train.norm(dim=1).max())
        scale = max(float(want.abs().max()), 1e-2 * bound, 1e-30)
        err = float((index.exact_influence(test, sample) - want).abs().max()) / scale
        for m, res in enumerate(index.query(test, k=10)):
            for item in res.proponents + res.opponents:
                truth = ref_test[m] @ reference(ref_model, names, bundle.triples.mapped[item.train_index : item.train_index + 1],
                                                "bce")[0]
                err = max(err, abs(item.influence - float(truth)) / scale)
        result[layers].update(status="exact" if err <= 1e-4 else "WRONG", error=err,
                              seconds=round(time.perf_counter() - started, 1), zero=bool(want.abs().max() == 0))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--only", default=None, help="comma-separated families (default: all)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per family")
    parser.add_argument("--family", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.family:
        print(json.dumps(one_family(args.family, args.epochs, args.dim, Path(args.root))))
        return
    from pykeen.models import model_resolver

    families = sorted(args.only.split(",") if args.only else model_resolver.lookup_dict)
    rows = []
    for name in families:
        if name in SKIPPED:
            rows.append(f"| {name} | - | skipped: {SKIPPED[name]} | skipped |")
            continue
        with tempfile.TemporaryDirectory() as root:
            cmd = [sys.executable, __file__, "--family", name, "--root", root, "--epochs", str(args.epochs),
                   "--dim", str(args.dim)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
            except subprocess.TimeoutExpired:
                rows.append(f"| {name} | - | TIMEOUT | TIMEOUT |")
                continue
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append(f"| {name} | - | exit {proc.returncode}: {last} | exit {proc.returncode} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])

        def status(s: dict[str, Any]) -> str:
            if s["status"] == "refused":
                return f"refused: {s['message']}"
            warn = f"; warns: {s['warnings'][0]}" if s["warnings"] else ""
            return f"{s['status']} ({s['error']:.0e}{', all zero' if s['zero'] else ''}{warn})"

        tracked = r["last:2"].get("tracked") or r["all"].get("tracked", [])[:0]
        shown = ", ".join(f"`{n}` ({k})" for n, k in tracked) or "-"
        rows.append(f"| {name} | {shown} | {status(r['last:2'])} | {status(r['all'])} |")
        print(f"done {name}", file=sys.stderr)
    print(f"\nNations, LCWA + BCEWithLogits, {args.epochs} epochs, embedding_dim={args.dim}; last:2 with sparse k=1024, "
          "all with --projection none; error = max |ours - autograd| / max(|autograd|, 1% of |g_test| |g_train|)\n")
    print("| family | last:2 tracks (form) | last:2 | all |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
