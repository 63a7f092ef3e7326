"""An index at an s3:// URL, against a real S3-compatible server (moto's) on loopback: build, resume
after SIGKILL, one builder (the lock object), publish, query, distributed builds, clean errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

try:
    import s3fs
    from moto.server import ThreadedMotoServer
except ImportError as exc:  # pragma: no cover - the dev extra installs both
    pytest.skip(f"the S3 tests need moto[server] and s3fs (pip install -e '.[dev]'): {exc}", allow_module_level=True)

from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model, open_index
from tracin_index.build import build_shard, finalize_build, prepare_build
from tracin_index.cli import main
from tracin_index.errors import StoreError
from tracin_index.store import BuildLock, ObjectLock, Store, resolve

from .conftest import Trained

ARRAYS = ("grads", "triples", "train_index", "self_influence", "norms", "done", "entity_labels", "relation_labels")
CLI = [sys.executable, "-m", "tracin_index.cli"]
CONFIG = BuildConfig(projection=ProjectionSpec("sparse", 256, 0), unit_rows=64, batch_size=32)  # = _build_cmd's options
BUCKET = "tracin"
TEST = "brazil embassy uk"


@pytest.fixture(scope="module")
def fs() -> Iterator[Any]:
    """moto's S3 server on a free loopback port, credentials and endpoint in the environment (subprocesses
    inherit them), one bucket; yields an s3fs filesystem on it."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        s3fs.S3FileSystem.clear_instance_cache()
        filesystem = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
        filesystem.mkdir(BUCKET)
        yield filesystem
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def local(conve_inverse: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same build on local disk: the arrays every S3 build must equal byte for byte."""
    out = tmp_path_factory.mktemp("s3ref") / "local"
    build_index(load_model(conve_inverse.directory), out, checkpoints=conve_inverse.checkpoints, config=CONFIG)
    return out


def _build_cmd(trained: Trained, out: str, *extra: str) -> list[str]:
    cmd = [*CLI, "build", "--model", str(trained.directory), "--out", out, "--dim", "256", "--unit-rows", "64",
           "--batch-size", "32", "--threads", "1"]
    for path, lr in trained.checkpoints:
        cmd += ["--checkpoint", path, "--lr", repr(lr)]
    return [*cmd, *extra]


def _local_bytes(build: Path) -> dict[str, bytes]:
    return {str(f.relative_to(build)): f.read_bytes()
            for name in ARRAYS for f in sorted((build / name).rglob("*")) if f.is_file()}


def _object_bytes(fs: Any, url: str) -> dict[str, bytes]:
    """Every object of every array of the build ``url`` (chunks and metadata), keyed like :func:`_local_bytes`."""
    key = url.removeprefix("s3://")
    keys = [k for name in ARRAYS for k in sorted(fs.find(f"{key}/{name}"))]
    return {k[len(key) + 1:]: bytes(v) for k, v in fs.cat(keys).items()}


def _builds(fs: Any, index: str) -> list[str]:
    key = index.removeprefix("s3://") + "/builds"
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(key, detail=False)) if fs.exists(key) else []


def _done_flags(fs: Any, index: str) -> int:
    key = index.removeprefix("s3://") + "/builds"
    return sum(1 for k in fs.find(key) if "/done/c/" in k) if fs.exists(key) else 0


@pytest.mark.slow
def test_cli_build_publish_and_query_equal_a_local_build(conve_inverse: Trained, local: Path, fs: Any) -> None:
    index = f"s3://{BUCKET}/a"
    runner = CliRunner()
    res = runner.invoke(main, _build_cmd(conve_inverse, index)[3:])
    assert res.exit_code == 0, res.output
    assert f"into {index} " in res.output
    assert fs.cat_file(f"{BUCKET}/a/LATEST").decode().strip() == _builds(fs, index)[0]  # published: one PUT
    assert not fs.exists(f"{BUCKET}/a/.lock"), "the lock object is deleted on release"
    build = resolve(index)
    assert str(build).startswith(f"{index}/builds/")
    assert _object_bytes(fs, str(build)) == _local_bytes(resolve(local))

    again = runner.invoke(main, _build_cmd(conve_inverse, index)[3:])
    assert again.exit_code == 0 and "is up to date" in again.output

    q_s3 = runner.invoke(main, ["query", index, "--triple", TEST, "--json"])
    q_local = runner.invoke(main, ["query", str(local), "--triple", TEST, "--json"])
    assert q_s3.exit_code == 0, q_s3.output
    assert json.loads(q_s3.output) == json.loads(q_local.output)
    assert open_index(index).query(TEST, k=5) == open_index(local).query(TEST, k=5)
    for args in (["verify", index], ["info", index], ["self-influence", index, "--top", "3"], ["gc", index]):
        res = runner.invoke(main, args)
        assert res.exit_code == 0, (args, res.output)
    assert runner.invoke(main, ["self-influence", index, "--json"]).output == \
        runner.invoke(main, ["self-influence", str(local), "--json"]).output


@pytest.mark.slow
def test_sigkilled_build_resumes_to_identical_objects(conve_inverse: Trained, local: Path, fs: Any) -> None:
    index = f"s3://{BUCKET}/b"
    cmd = _build_cmd(conve_inverse, index)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _done_flags(fs, index) < 8:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no clean-up; the lock object stays behind
    proc.wait()
    done = _done_flags(fs, index)
    assert 8 <= done < int(Store.open(local).attrs["num_units"]), "killed mid-build"
    assert not fs.exists(f"{BUCKET}/b/LATEST"), "nothing is published before the build is complete"
    assert json.loads(fs.cat_file(f"{BUCKET}/b/.lock"))["pid"] == proc.pid
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert f"took over the lock of a build that is no longer running ({{\"pid\": {proc.pid}" in res.stderr
    assert "its process is gone" in res.stderr
    assert "resuming build" in res.stderr and f"{done} of 25 write units are done" in res.stderr
    assert len(_builds(fs, index)) == 1, "the resumed build is the same build, not a new one"
    assert _object_bytes(fs, str(resolve(index))) == _local_bytes(resolve(local))


@pytest.mark.slow
def test_second_builder_fails_fast_while_the_lock_is_held(conve_inverse: Trained, fs: Any) -> None:
    index = f"s3://{BUCKET}/c"
    with BuildLock(index) as held:  # a build running elsewhere (this process)
        assert isinstance(held, ObjectLock)
        started = time.time()
        second = subprocess.run(_build_cmd(conve_inverse, index), capture_output=True, text=True, check=False)
        assert second.returncode == 2
        assert f"is being built by pid {os.getpid()} on host {socket.gethostname()}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
        assert time.time() - started < 60  # it did not wait
        assert json.loads(fs.cat_file(f"{BUCKET}/c/.lock"))["token"] == held.token, "the holder's lock is untouched"
    assert not fs.exists(f"{BUCKET}/c/.lock")
    assert not _builds(fs, index), "the refused builder wrote nothing"


def test_lock_lease_is_renewed_expires_and_is_taken_over(fs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    index = f"s3://{BUCKET}/lease"
    key = f"{BUCKET}/lease/.lock"
    # another host's lock with a live lease: refused; the same lock with its lease run out: taken over
    live = {"pid": 4242, "host": "elsewhere", "started": "2026-01-01T00:00:00Z", "token": "t", "expires": time.time() + 600}
    fs.pipe_file(key, json.dumps(live).encode())
    with pytest.raises(StoreError, match="is being built by pid 4242 on host elsewhere"):
        BuildLock(index).acquire()
    fs.pipe_file(key, json.dumps({**live, "expires": time.time() - 5}).encode())
    lock = BuildLock(index).acquire()
    assert isinstance(lock, ObjectLock)
    assert lock.took_over is not None and "4242" in lock.took_over and "lease expired" in lock.took_over
    lock.release()
    assert not fs.exists(key)

    monkeypatch.setenv("TRACIN_INDEX_LOCK_LEASE", "0.8")
    lock = ObjectLock(index).acquire()
    first = json.loads(fs.cat_file(key))["expires"]
    time.sleep(0.6)  # the heartbeat renews every quarter lease
    assert json.loads(fs.cat_file(key))["expires"] > first
    assert lock.lost is None
    lock.check()
    # a holder that stalls past its lease loses the lock to the next builder, and then refuses to publish
    lock._stop.set()
    assert lock._heartbeat is not None
    lock._heartbeat.join()
    time.sleep(1.0)
    other = ObjectLock(index).acquire()
    assert other.took_over is not None and "lease expired" in other.took_over
    lock._stop.clear()
    lock._renew_once()
    with pytest.raises(StoreError, match="lost its lock"):
        lock.check()
    lock.release()
    assert json.loads(fs.cat_file(key))["token"] == other.token, "the former holder does not delete the new lock"
    other.release()


@pytest.mark.slow
def test_shards_on_s3_equal_a_local_build(conve_inverse: Trained, local: Path, fs: Any) -> None:
    index = f"s3://{BUCKET}/d"
    bundle = load_model(conve_inverse.directory)
    ckpts = conve_inverse.checkpoints
    store = prepare_build(bundle, index, checkpoints=ckpts, config=CONFIG)
    assert not store.done().any()
    assert fs.cat_file(f"{BUCKET}/d/PREPARED").decode().strip() == store.path.name
    reports = [build_shard(bundle, index, (i, 2), checkpoints=ckpts, config=CONFIG) for i in (1, 0)]
    assert sum(r["units_computed"] for r in reports) == 25
    published = finalize_build(index)
    assert published.path == store.path and not fs.exists(f"{BUCKET}/d/PREPARED")
    assert _object_bytes(fs, str(resolve(index))) == _local_bytes(resolve(local))


def test_missing_bucket_unreachable_endpoint_and_no_credentials_are_one_line(
        conve_inverse: Trained, fs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()

    def one_line(args: list[str], message: str) -> None:
        res = runner.invoke(main, args)
        assert res.exit_code != 0, res.output
        assert message in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output

    one_line(["query", "s3://no-such-bucket/idx", "--triple", TEST], "bucket 'no-such-bucket' does not exist")
    one_line(["build", "--model", str(conve_inverse.directory), "--out", "s3://no-such-bucket/idx"],
             "bucket 'no-such-bucket' does not exist")
    one_line(["info", f"s3://{BUCKET}/nothing-here"], f"index s3://{BUCKET}/nothing-here not found")
    one_line(["info", "gs://bucket/idx"], "gs:// is not supported")
    try:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
        s3fs.S3FileSystem.clear_instance_cache()
        one_line(["info", f"s3://{BUCKET}/idx"], f"cannot reach the object store at http://127.0.0.1:{closed}")
        monkeypatch.undo()
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(var)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        s3fs.S3FileSystem.clear_instance_cache()
        one_line(["info", f"s3://{BUCKET}/idx"], "no credentials for s3://")
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()
