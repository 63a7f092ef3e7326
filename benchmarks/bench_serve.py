"""The query service over HTTP: cold start, warm ad-hoc latency, concurrent clients, and a build published under load.

Starts ``tracin-index serve`` as its own process on a free loopback port and talks to it with ``http.client``
(one keep-alive connection per client thread). Prints a markdown table; nothing is downloaded.

    python benchmarks/bench_serve.py --triples 5000 [--threads 2] [--queries 100] [--clients 8] [--workdir DIR]
    python benchmarks/bench_serve.py --index PATH [--threads 2] [--queries 100] [--clients 8]

``--triples N``: the synthetic FB15k-237-shaped KG and ConvE d=200 of ``bench_build.py`` / ``bench_query.py``
(random test triples), saved with label files so that the service process loads the model itself from what the
index records. ``--workdir DIR`` keeps the model and the index there and reuses them on the next run. The
publish run rebuilds the index (``build_index(..., force=True)``, as the nightly job does) in this process while
the clients query.

``--index PATH``: an existing index home (its recorded model must be loadable here). The service runs on a
temporary home whose builds are links to PATH's published build, and the publish run publishes a second link
to the same build: the service opens it and swaps it in, without a rebuild. PATH itself is not changed.

Rows:
- cold start: process start to the first answer (and to the port answering, and to the search's background
  work done, after which the warm figures are measured);
- warm ad-hoc /api/query, one test triple, top-10: p50 / p99 over ``--queries`` with one client;
- ``--clients`` concurrent clients, 25 queries each: p50 / p99, answers per second and failed requests;
- the publish run: ``--clients`` clients query while a new build is published; requests, failures (anything but
  200), answers per build, the time from LATEST written to the first answer that names the new build.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_build import synthetic_bundle

ENTITIES, RELATIONS = 14541, 237  # bench_query.py's synthetic shape
PER_CLIENT = 25  # queries per client in the concurrent run


def synthetic_home(n: int, root: Path) -> tuple[Path, Any, list[str], list[str]]:
    """The synthetic model saved with label files (loadable by the service process), and its index home."""
    from tracin_index import BuildConfig, build_index, load_model

    home = root / "idx"
    model = root / "model.pt"
    paths = [root / "train.tsv", root / "entities.tsv", root / "relations.tsv"]
    entities = [f"e{i}" for i in range(ENTITIES)]
    relations = [f"r{i}" for i in range(RELATIONS)]
    if not model.exists() or not all(p.exists() for p in paths):
        bundle = synthetic_bundle(n, ENTITIES, RELATIONS, root)
        mapped = bundle.triples.mapped.tolist()
        paths[0].write_text("".join(f"e{h}\tr{r}\te{t}\n" for h, r, t in mapped))
        paths[1].write_text("".join(f"{label}\t{i}\n" for i, label in enumerate(entities)))
        paths[2].write_text("".join(f"{label}\t{i}\n" for i, label in enumerate(relations)))
    bundle = load_model(model, triples=paths[0], entity_to_id=paths[1], relation_to_id=paths[2])
    if not (home / "LATEST").exists():
        build_index(bundle, home, config=BuildConfig())
    return home, bundle, entities, relations


def linked_home(index: Path, root: Path) -> tuple[Path, str, list[str], list[str]]:
    """A temporary home whose only build is a link to ``index``'s published build; its labels."""
    from tracin_index.store import Store, latest_build, publish

    build = latest_build(index)
    if not isinstance(build, Path):
        sys.exit(f"{index} has no published build (or is not a local directory)")
    home = root / "idx"
    (home / "builds").mkdir(parents=True)
    link = home / "builds" / build.name
    link.symlink_to(build.resolve(), target_is_directory=True)
    publish(home, link)
    entities, relations = Store.open(link).labels()
    return home, str(build.resolve()), entities, relations


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    """One keep-alive HTTP connection to the service."""

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.port, self.timeout = port, timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        try:
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            raise
        return response.status, json.loads(raw) if raw else {}

    def close(self) -> None:
        self.conn.close()


@dataclass
class Load:
    """What the clients of one run saw."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    builds: list[tuple[float, str]] = field(default_factory=list)  # (answered at, build)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(port: int, triples: list[str], load: Load, count: int | None, stop: threading.Event | None) -> None:
    """Query ``count`` triples (or until ``stop``), one at a time, recording latencies, builds and failures."""
    client = Client(port)
    i = 0
    try:
        while (count is None or i < count) and not (stop is not None and stop.is_set()):
            triple = triples[i % len(triples)]
            i += 1
            started = time.perf_counter()
            try:
                status, body = client.call("POST", "/api/query", {"triples": [triple], "k": 10})
            except (OSError, http.client.HTTPException) as exc:
                with load.lock:
                    load.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - started
            with load.lock:
                if status != 200:
                    load.failures.append(f"{status}: {body.get('error')}")
                else:
                    load.latencies.append(elapsed)
                    load.builds.append((time.monotonic(), body["build"]))
    finally:
        client.close()


def ms(values: list[float], q: float) -> str:
    return f"{np.percentile(np.array(values) * 1000, q):.0f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--triples", type=int, help="build a synthetic index of this many training triples")
    where.add_argument("--index", type=Path, help="an existing index home (not changed)")
    parser.add_argument("--workdir", type=Path, default=None, help="with --triples: keep (and reuse) the model and index here")
    parser.add_argument("--queries", type=int, default=100, help="warm queries with one client")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--threads", type=int, default=2, help="the service's --threads")
    parser.add_argument("--max-concurrency", type=int, default=8, help="the service's --max-concurrency")
    parser.add_argument("--no-batch", action="store_true", help="the service's --no-batch (each query answered alone)")
    parser.add_argument("--device", default="cpu", help="the service's --device")
    parser.add_argument("--log", type=Path, default=None, help="the service's log (default: discarded)")
    args = parser.parse_args()
    logging.getLogger("pykeen").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    from tracin_index import BuildConfig, build_index
    from tracin_index.runtime import configure_threads
    from tracin_index.store import latest_build, publish

    configure_threads(args.threads, tune_allocator=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle, target = None, ""
        if args.triples is not None:
            work = args.workdir or root / "work"
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            home, bundle, entities, relations = synthetic_home(args.triples, work)
            source = f"synthetic, {args.triples:,} triples (model and index ready in {time.perf_counter() - t0:.0f} s)"
        else:
            home, target, entities, relations = linked_home(args.index, root)
            source = f"{args.index} (build {Path(target).name})"
        rng = random.Random(1)
        triples = [f"{rng.choice(entities)} {rng.choice(relations)} {rng.choice(entities)}" for _ in range(1000)]

        port = free_port()
        log = open(args.log, "w") if args.log else open(os.devnull, "w")
        command = [sys.executable, "-m", "tracin_index.cli", "serve", str(home), "--port", str(port),
                   "--threads", str(args.threads), "--device", args.device, "--poll", "0.5",
                   "--max-concurrency", str(args.max_concurrency)] + (["--no-batch"] if args.no_batch else [])
        started = time.perf_counter()
        service = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            probe = Client(port, timeout=600)
            while True:
                if service.poll() is not None:
                    sys.exit(f"the service exited with {service.returncode} (see --log)")
                try:
                    status, info = probe.call("GET", "/api/info")
                    break
                except OSError:
                    time.sleep(0.05)
            listening = time.perf_counter() - started
            status, body = probe.call("POST", "/api/query", {"triples": [triples[0]], "k": 10})
            assert status == 200, body
            cold = time.perf_counter() - started
            while not probe.call("GET", "/api/info")[1]["ready"]:
                time.sleep(0.05)
            ready = time.perf_counter() - started
            first_build = info["build"]

            for triple in triples[1:6]:  # warm-up
                probe.call("POST", "/api/query", {"triples": [triple], "k": 10})
            one = Load()
            client_loop(port, triples[10:], one, args.queries, None)

            many = Load()
            t0 = time.perf_counter()
            workers = [threading.Thread(target=client_loop, args=(port, triples[100 + 25 * c:], many, PER_CLIENT, None))
                       for c in range(args.clients)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t0

            # the publish run: clients query while a new build is published
            pub = Load()
            stop = threading.Event()
            workers = [threading.Thread(target=client_loop, args=(port, triples[500 + 50 * c:], pub, None, stop))
                       for c in range(args.clients)]
            for w in workers:
                w.start()
            time.sleep(2.0)
            t_build = time.perf_counter()
            if bundle is not None:
                build_index(bundle, home, config=BuildConfig(), force=True)
                new = latest_build(home)
                assert new is not None
            else:
                new = home / "builds" / f"{first_build}-again"
                new.symlink_to(Path(target), target_is_directory=True)
                publish(home, new)
            published = time.monotonic()
            t_build = time.perf_counter() - t_build
            deadline = published + 600
            while time.monotonic() < deadline:
                with pub.lock:
                    if any(b == new.name for _, b in pub.builds):
                        break
                time.sleep(0.05)
            time.sleep(2.0)
            stop.set()
            for w in workers:
                w.join()
            swapped = [at for at, b in pub.builds if b == new.name]
            counts = {b: sum(1 for _, x in pub.builds if x == b) for b in (first_build, new.name)}
            unknown = len(pub.builds) - sum(counts.values())
        finally:
            service.terminate()
            try:
                service.wait(30)
            except subprocess.TimeoutExpired:
                service.kill()
            log.close()

    batching = " --no-batch" if args.no_batch else ""
    print(f"\nbench_serve: {source}; service --threads {args.threads} --max-concurrency {args.max_concurrency}{batching} "
          f"--device {args.device}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("\n| measure | value |\n|---|---|")
    print(f"| cold start: process start to first /api/query answer | {cold:.2f} s |")
    print(f"| ... to the port answering / to the search's background work done | {listening:.2f} s / {ready:.2f} s |")
    print(f"| warm /api/query (1 triple, top-10), 1 client: p50 / p99 over {len(one.latencies)} | "
          f"{ms(one.latencies, 50)} / {ms(one.latencies, 99)} ms |")
    print(f"| failed requests, 1 client | {len(one.failures)} |")
    n_many = args.clients * PER_CLIENT
    print(f"| {args.clients} concurrent clients, {n_many} queries: p50 / p99 | {ms(many.latencies, 50)} / "
          f"{ms(many.latencies, 99)} ms ({len(many.latencies) / wall:.1f} answers/s) |")
    print(f"| failed requests, {args.clients} clients | {len(many.failures)} |")
    how = "rebuilt (force) in the benchmark's process" if bundle is not None else "a second link to the same build"
    print(f"| publish under load: new build {how} | published {t_build:.1f} s after the start of publishing |")
    print(f"| publish run: requests / failed / answers per build (old, new) | {len(pub.builds) + len(pub.failures)} / "
          f"{len(pub.failures)} / {counts[first_build]}, {counts[new.name]} |")
    print(f"| publish run: LATEST written to first answer from the new build | "
          f"{(min(swapped) - published if swapped else float('nan')):.2f} s |")
    print(f"| publish run: p99 latency | {ms(pub.latencies, 99)} ms |")
    if unknown or not swapped:
        print(f"| PROBLEM | {unknown} answers named another build; new build answered: {bool(swapped)} |")
    for failure in (one.failures + many.failures + pub.failures)[:5]:
        print(f"| failure | {failure} |")


if __name__ == "__main__":
    main()
