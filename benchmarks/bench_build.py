"""Index build time next to the floor: one eval-mode forward pass (score_hrt) over the same triples.

Synthetic KG shaped like FB15k-237 (14,541 entities, 237 relations), ConvE at pykeen's defaults
(d=200, 32 filters: a 10368x200 Linear), random-initialised, trained with inverse triples. Prints a
markdown table; nothing is downloaded.

    python benchmarks/bench_build.py [--triples 20000] [--batch-size 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch


def synthetic_bundle(n: int, entities: int, relations: int, root: Path):  # type: ignore[no-untyped-def]
    from pykeen.models import ConvE
    from pykeen.triples import CoreTriplesFactory

    from tracin_index.model import ModelBundle, TriplesData

    gen = torch.Generator().manual_seed(0)
    mapped = torch.stack([torch.randint(entities, (n,), generator=gen), torch.randint(relations, (n,), generator=gen),
                          torch.randint(entities, (n,), generator=gen)], dim=1)
    tf = CoreTriplesFactory.create(mapped_triples=mapped, num_entities=entities, num_relations=relations,
                                   create_inverse_triples=True)
    model = ConvE(triples_factory=tf, embedding_dim=200, output_channels=32, random_seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    path = root / "model.pt"
    torch.save(model, path)
    data = TriplesData(mapped=mapped, entity_labels=[f"e{i}" for i in range(entities)],
                       relation_labels=[f"r{i}" for i in range(relations)])
    return ModelBundle(model=model, triples=data, source={"path": str(path), "kind": "module"})


def forward_floor(model, mapped: torch.Tensor, batch_size: int, both_directions: bool) -> float:  # type: ignore[no-untyped-def]
    from tracin_index.model import internal_rows

    started = time.perf_counter()
    with torch.no_grad():
        for s in range(0, mapped.shape[0], batch_size):
            rows, _ = internal_rows(model, mapped[s : s + batch_size])
            model.score_hrt(rows if both_directions else rows[: min(batch_size, mapped.shape[0] - s)])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    logging.getLogger("pykeen").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    from tracin_index import BuildConfig, ProjectionSpec, build_index
    from tracin_index.runtime import configure_threads

    configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = synthetic_bundle(args.triples, 14541, 237, root)
        n = args.triples
        forward_floor(bundle.model, bundle.triples.mapped[:2048], args.batch_size, True)  # warm-up
        floor_1 = forward_floor(bundle.model, bundle.triples.mapped, args.batch_size, False)
        floor_2 = forward_floor(bundle.model, bundle.triples.mapped, args.batch_size, True)
        rows = [("forward score_hrt, N rows (floor)", floor_1),
                ("forward score_hrt, 2N rows (both directions)", floor_2)]
        config = BuildConfig(projection=ProjectionSpec("sparse", args.dim, 0), batch_size=args.batch_size)
        started = time.perf_counter()
        store = build_index(bundle, root / "idx", config=config)
        total = time.perf_counter() - started
        rows.append((f"build, sparse k={args.dim}: gradients + projection + Zarr", store.attrs["timings"]["gradients_s"]))
        rows.append((f"build, sparse k={args.dim}: total (incl. load, verify, publish)", total))

    print(f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"workload: synthetic FB15k-237-shaped KG, {n:,} training triples, ConvE d=200 (inverse triples), "
          f"batch {args.batch_size}, last:2 layers\n")
    print("| step | seconds | triples/s | x floor (N rows) |")
    print("|---|---|---|---|")
    for name, secs in rows:
        print(f"| {name} | {secs:.2f} | {n / secs:,.0f} | {secs / floor_1:.2f} |")


if __name__ == "__main__":
    main()
