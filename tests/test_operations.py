"""The nightly build: resume after SIGKILL, atomic publish, one builder, skip, integrity, clean errors."""

from __future__ import annotations

import errno
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracin_index import BuildConfig, ProjectionSpec, build_index, load_model, open_index
from tracin_index.cli import main
from tracin_index.errors import InputError, StoreError
from tracin_index.model import TriplesData, load_label_triples, parse_triple
from tracin_index.store import Store, resolve

from .conftest import Trained

ARRAYS = ("grads", "triples", "train_index", "self_influence", "norms", "done", "entity_labels", "relation_labels")
CLI = [sys.executable, "-m", "tracin_index.cli"]


def _build_cmd(trained: Trained, out: Path, *extra: str) -> list[str]:
    cmd = [*CLI, "build", "--model", str(trained.directory), "--out", str(out), "--dim", "256", "--unit-rows", "64",
           "--batch-size", "32", "--threads", "1"]
    for path, lr in trained.checkpoints:
        cmd += ["--checkpoint", path, "--lr", repr(lr)]
    return [*cmd, *extra]


def _array_bytes(build: Path) -> dict[str, bytes]:
    """Every file of every array (chunks and metadata), keyed by relative path: byte identity of the arrays."""
    out = {}
    for name in ARRAYS:
        for f in sorted((build / name).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(build))] = f.read_bytes()
    return out


def _done_units(out: Path) -> int:
    return sum(len(list((b / "done" / "c").glob("*"))) for b in (out / "builds").glob("*") if (b / "done" / "c").is_dir())


@pytest.fixture(scope="module")
def reference(conve_inverse: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted build with the same settings as ``_build_cmd``."""
    out = tmp_path_factory.mktemp("ops") / "ref"
    res = subprocess.run(_build_cmd(conve_inverse, out), capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.slow
def test_sigkilled_build_resumes_to_identical_arrays(conve_inverse: Trained, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    cmd = _build_cmd(conve_inverse, out)
    total = int(Store.open(reference).attrs["num_units"])  # 25 units of 64 rows
    rng = random.Random(7)
    kills = sorted(rng.sample(range(1, total - 1), 3))
    for target in kills:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and _done_units(out) < target:
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no clean-up runs
        proc.wait()
        assert not (out / "LATEST").exists(), "nothing is published before the build is complete"
    # a kill between zarr's temporary write and its rename leaves NAME.<uuid>.partial; plant one so every run checks it
    (build,) = (out / "builds").iterdir()
    stray = build / "grads" / "c" / "0" / "0.0123456789abcdef0123456789abcdef.partial"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"torn")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "resuming build" in res.stderr
    assert not list(build.rglob("*.partial")), "the published build holds no temporary files of killed writes"
    assert len(list((out / "builds").iterdir())) == 1, "the resumed build is the same build, not a new one"
    assert _array_bytes(resolve(out)) == _array_bytes(resolve(reference))
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


@pytest.mark.slow
def test_two_builders_one_wins_the_other_fails_fast(conve_inverse: Trained, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    first = subprocess.Popen(_build_cmd(conve_inverse, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / ".lock").exists():
        time.sleep(0.01)
    while time.time() < deadline and str(first.pid) not in (out / ".lock").read_text():
        time.sleep(0.01)
    started = time.time()
    second = subprocess.run(_build_cmd(conve_inverse, out), capture_output=True, text=True, check=False)
    assert second.returncode == 2
    assert f"is being built by pid {first.pid} on host" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert time.time() - started < 30  # it did not wait for the first build
    assert first.wait(timeout=120) == 0
    assert _array_bytes(resolve(out)) == _array_bytes(resolve(reference))


def test_stale_lock_is_taken_over(conve_inverse: Trained, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2026-01-01T00:00:00Z"}))
    logs: list[str] = []
    build_index(load_model(conve_inverse.directory), out, config=BuildConfig(projection=ProjectionSpec("sparse", 64)),
                log=logs.append)
    assert any("took over the lock" in m and "999999" in m for m in logs)
    assert (out / "LATEST").exists()


def test_publish_skip_force_gc_and_damaged_builds(conve_inverse: Trained, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    bundle = load_model(conve_inverse.directory)
    config = BuildConfig(projection=ProjectionSpec("sparse", 64), unit_rows=400)
    first = build_index(bundle, out, checkpoints=conve_inverse.checkpoints, config=config)
    reader = open_index(out)  # a reader opened on the first build
    [before] = reader.query("brazil embassy uk", k=3)
    logs: list[str] = []
    again = build_index(bundle, out, checkpoints=conve_inverse.checkpoints, config=config, log=logs.append)
    assert again.build_report is not None and again.build_report["skipped"] and again.path == first.path
    assert any("up to date" in m for m in logs)
    forced = build_index(bundle, out, checkpoints=conve_inverse.checkpoints, config=config, force=True)
    assert forced.path != first.path and resolve(out) == forced.path
    assert reader.query("brazil embassy uk", k=3)[0] == before  # the old build still serves its reader
    other = build_index(bundle, out, checkpoints=conve_inverse.checkpoints[:1],
                        config=BuildConfig(projection=ProjectionSpec("sparse", 64), unit_rows=400))
    assert other.build_report is not None and not other.build_report["skipped"]  # another checkpoint set: rebuilt
    res = CliRunner().invoke(main, ["gc", str(out), "--keep", "1"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in (out / "builds").iterdir()] == [other.path.name]
    # a damaged published build is not "up to date": the next build replaces it
    chunk = next(f for f in sorted((other.path / "grads" / "c").rglob("*")) if f.is_file())
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    logs.clear()
    fixed = build_index(bundle, out, checkpoints=conve_inverse.checkpoints[:1],
                        config=BuildConfig(projection=ProjectionSpec("sparse", 64), unit_rows=400), log=logs.append)
    assert any("is damaged" in m for m in logs) and fixed.path != other.path


def test_flipped_bytes_are_named_by_verify_and_query(conve_inverse: Trained, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_index(load_model(conve_inverse.directory), out, checkpoints=conve_inverse.checkpoints,
                config=BuildConfig(projection=ProjectionSpec("sparse", 64), unit_rows=200))
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(out)])
    assert ok.exit_code == 0 and "sound" in ok.output
    chunk = resolve(out) / "grads" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[77] ^= 0x01  # one bit
    chunk.write_bytes(bytes(data))
    bad = runner.invoke(main, ["verify", str(out), "--no-model"])
    assert bad.exit_code == 1
    assert "array 'grads' chunk 3 (rows 600-799) is corrupt" in bad.output
    q = runner.invoke(main, ["query", str(out), "--triple", "brazil embassy uk"])
    assert q.exit_code == 2 and "array 'grads' chunk 3 (rows 600-799) is corrupt" in q.output
    assert "Traceback" not in q.output and len(q.output.strip().splitlines()) == 1
    norms = resolve(out) / "norms" / "c" / "1" / "0"
    data = bytearray(norms.read_bytes())
    data[5] ^= 0x01
    norms.write_bytes(bytes(data))
    bad = runner.invoke(main, ["verify", str(out), "--no-model", "--json"])
    report = json.loads(bad.output)
    assert not report["ok"] and any("array 'norms' chunk 1" in p for p in report["problems"])


def test_no_space_left_keeps_serving_and_resumes(conve_inverse: Trained, reference: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "idx"
    runner = CliRunner()
    cmd = _build_cmd(conve_inverse, out)[3:]  # same settings as the reference, in-process
    old = runner.invoke(main, [*cmd, "--seed", "5"])  # a previous, different build that readers use
    assert old.exit_code == 0, old.output
    published = (out / "LATEST").read_text()
    original = Store.write_unit
    calls = {"n": 0}

    def full_disk(self: Store, u: int, *args: object) -> None:
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, u, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "write_unit", full_disk)
    res = runner.invoke(main, cmd)
    assert res.exit_code == 2
    assert "no space left on the device" in res.output and "run the same command again" in res.output
    assert "Traceback" not in res.output
    assert (out / "LATEST").read_text() == published  # readers still get the previous build
    assert open_index(out).query("brazil embassy uk", k=2)[0].proponents
    monkeypatch.setattr(Store, "write_unit", original)
    res = runner.invoke(main, cmd)
    assert res.exit_code == 0, res.output
    assert "resuming build" in res.output and "5 of 25 write units are done" in res.output
    assert _array_bytes(resolve(out)) == _array_bytes(resolve(reference))


def test_diverged_checkpoint_is_reported_and_nothing_is_left(conve_inverse: Trained, tmp_path: Path) -> None:
    path, lr = conve_inverse.checkpoints[1]
    state = torch.load(path, weights_only=True)
    state["interaction.hr1d.0.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    out = tmp_path / "idx"
    res = CliRunner().invoke(main, ["build", "--model", str(conve_inverse.directory), "--out", str(out), "--checkpoint",
                                    str(tmp_path / "nan.pt"), "--lr", str(lr)])
    assert res.exit_code == 2 and "is NaN or infinite" in res.output and "diverged" in res.output
    assert not out.exists() or not list((out / "builds").iterdir())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("missing_model", "not found"),
        ("id_map_mismatch", "entity"),
        ("empty_train", "holds no triples"),
        ("other_architecture", "is not a state of this model's architecture"),
        ("out_inside_input", "would overwrite or nest inside the input"),
        ("bad_dim", "--dim 70000 is out of range"),
    ],
)
def test_bad_input_one_line_and_nothing_written(conve_inverse: Trained, distmult_plain: Trained, tmp_path: Path,
                                                make: str, message: str) -> None:
    ref = load_model(conve_inverse.directory)
    ent, rel = ref.triples.entity_labels, ref.triples.relation_labels
    (tmp_path / "e.tsv").write_text("".join(f"{e}\t{i}\n" for i, e in enumerate(ent[:-1])))  # one entity short
    (tmp_path / "e_ok.tsv").write_text("".join(f"{e}\t{i}\n" for i, e in enumerate(ent)))
    (tmp_path / "r.tsv").write_text("".join(f"{r}\t{i}\n" for i, r in enumerate(rel)))
    (tmp_path / "empty.tsv").write_text("\n")
    (tmp_path / "train.tsv").write_text("".join(f"{ent[h]}\t{rel[r]}\t{ent[t]}\n" for h, r, t in ref.triples.mapped[:50].tolist()
                                                if h < len(ent) - 1 and t < len(ent) - 1))
    torch.save(ref.model, tmp_path / "model.pt")
    out = tmp_path / "out"
    base = ["build", "--model", str(conve_inverse.directory), "--out", str(out)]
    args = {
        "missing_model": ["build", "--model", str(tmp_path / "nope"), "--out", str(out)],
        "id_map_mismatch": ["build", "--model", str(tmp_path / "model.pt"), "--triples", str(tmp_path / "train.tsv"),
                            "--entity-to-id", str(tmp_path / "e.tsv"), "--relation-to-id", str(tmp_path / "r.tsv"),
                            "--out", str(out)],
        "empty_train": ["build", "--model", str(tmp_path / "model.pt"), "--triples", str(tmp_path / "empty.tsv"),
                        "--entity-to-id", str(tmp_path / "e_ok.tsv"), "--relation-to-id", str(tmp_path / "r.tsv"),
                        "--out", str(out)],
        "other_architecture": [*base, "--checkpoint", distmult_plain.checkpoints[0][0], "--lr", "0.1"],
        "out_inside_input": ["build", "--model", str(conve_inverse.directory), "--out",
                             str(conve_inverse.directory / "idx")],
        "bad_dim": [*base, "--dim", "70000"],
    }[make]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists() and not (conve_inverse.directory / "idx").exists()
    debug = CliRunner().invoke(main, [*args, "--debug"])
    assert debug.exit_code != 0 and isinstance(debug.exception, InputError | StoreError)


# ---------------------------------------------------------------------------------------------- fuzzing

LABELS = TriplesData(mapped=torch.zeros((0, 3), dtype=torch.long), entity_labels=["a", "b b", "c\u00e9", "d-1"],
                     relation_labels=["r", "rel two", "3"])
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(text)
def test_parse_triple_never_crashes(s: str) -> None:
    try:
        h, r, t = parse_triple(s, LABELS)
    except InputError as exc:
        assert "\n" not in str(exc)  # labels are quoted with repr(): one line whatever the input
        return
    assert 0 <= h < 4 and 0 <= r < 3 and 0 <= t < 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LABELS.entity_labels), st.sampled_from(LABELS.relation_labels),
                          st.sampled_from(LABELS.entity_labels)), min_size=1, max_size=20))
def test_parse_triple_round_trips_tab_separated_labels(triples: list[tuple[str, str, str]]) -> None:
    e2i, r2i = LABELS.entity_to_id, LABELS.relation_to_id
    for h, r, t in triples:
        assert parse_triple(f"{h}\t{r}\t{t}", LABELS) == (e2i[h], r2i[r], e2i[t])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(text, st.lists(st.sampled_from(["a", "r", "b b", "x", ""]), max_size=5).map("\t".join)),
                max_size=8))
def test_label_tsv_reader_never_crashes(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "fuzz.tsv"
    path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogatepass"))
    try:
        out = load_label_triples(path, LABELS.entity_to_id, LABELS.relation_to_id)
    except InputError as exc:
        assert str(exc).startswith("triples file")
        return
    assert out.dtype == torch.long and out.shape[1] == 3 and len(out) >= 1
    assert bool((out[:, [0, 2]] < 4).all()) and bool((out[:, 1] < 3).all()) and bool((out >= 0).all())


def test_resolve_refuses_non_indexes(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not found"):
        resolve(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="is not a tracin-index index"):
        resolve(tmp_path / "plain")
    (tmp_path / "half" / "builds").mkdir(parents=True)
    with pytest.raises(StoreError, match="no published build yet"):
        resolve(tmp_path / "half")


@pytest.mark.slow
def test_nightly_job_stages_and_exit_codes(conve_inverse: Trained, tmp_path: Path) -> None:
    script = Path(__file__).parent.parent / "pipelines" / "nightly_build.py"
    out = tmp_path / "idx"
    cmd = [sys.executable, str(script), "--model", str(conve_inverse.directory), "--out", str(out),
           "--smoke", "brazil embassy uk", "--", "--dim", "64"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    stages = [line.split()[2:4] for line in first.stderr.splitlines()]
    assert stages == [["build", "ok"], ["verify", "ok"], ["smoke-query", "ok"], ["gc", "ok"]]
    second = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert second.returncode == 0 and " nightly build skipped " in second.stderr
    from tracin_index.store import BuildLock

    with BuildLock(out):  # a build "running" elsewhere
        busy = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert busy.returncode == 3 and "nightly build busy" in busy.stderr
    bad = subprocess.run([*cmd[:3], str(tmp_path / "missing"), *cmd[4:]], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "nightly build failed" in bad.stderr and "not found" in bad.stderr


def test_labels_and_missing_chunks_are_checked(conve_inverse: Trained, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    config = BuildConfig(projection=ProjectionSpec("sparse", 64), unit_rows=400)
    bundle = load_model(conve_inverse.directory)
    build_index(bundle, out, checkpoints=conve_inverse.checkpoints, config=config)
    runner = CliRunner()
    labels = resolve(out) / "entity_labels" / "c" / "0"
    data = bytearray(labels.read_bytes())
    data[len(data) // 2] ^= 0x01
    labels.write_bytes(bytes(data))
    bad = runner.invoke(main, ["verify", str(out), "--no-model"])
    assert bad.exit_code == 1 and "array 'entity_labels' chunk 0" in bad.output
    q = runner.invoke(main, ["query", str(out), "--triple", "brazil embassy uk"])
    assert q.exit_code == 2 and "array 'entity_labels' chunk 0" in q.output
    # a chunk file that is gone (an interrupted copy) is damage, not zeros; the next build replaces the build
    out2 = tmp_path / "idx2"
    build_index(bundle, out2, checkpoints=conve_inverse.checkpoints, config=config)
    (resolve(out2) / "grads" / "c" / "1" / "0").unlink()
    bad = runner.invoke(main, ["verify", str(out2), "--no-model"])
    assert bad.exit_code == 1 and "array 'grads' has 1 of 4 chunks missing" in bad.output
    logs: list[str] = []
    rebuilt = build_index(bundle, out2, checkpoints=conve_inverse.checkpoints, config=config, log=logs.append)
    assert any("is damaged" in m for m in logs) and rebuilt.build_report and not rebuilt.build_report["skipped"]


def test_failed_verification_is_not_resumed_forever(conve_inverse: Trained, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import tracin_index.build as build_module

    out = tmp_path / "idx"
    bundle = load_model(conve_inverse.directory)
    config = BuildConfig(projection=ProjectionSpec("sparse", 64), unit_rows=400)
    monkeypatch.setattr(build_module, "verify_rows", lambda store: ["array 'grads' chunk 0 is corrupt (simulated)"])
    with pytest.raises(StoreError, match="failed its verification"):
        build_index(bundle, out, checkpoints=conve_inverse.checkpoints, config=config)
    monkeypatch.undo()
    logs: list[str] = []
    store = build_index(bundle, out, checkpoints=conve_inverse.checkpoints, config=config, log=logs.append)
    assert not any("resuming" in m for m in logs) and store.attrs["status"] == "complete"
    assert len(list((out / "builds").iterdir())) == 2  # the failed build stays for inspection; gc --incomplete removes it
    res = CliRunner().invoke(main, ["gc", str(out), "--incomplete"])
    assert res.exit_code == 0 and [p.name for p in (out / "builds").iterdir()] == [store.path.name]


def test_float16_overflow_is_reported_and_float32_stores_it(conve_inverse: Trained, tmp_path: Path) -> None:
    path, _ = conve_inverse.checkpoints[1]
    args = ["build", "--model", str(conve_inverse.directory), "--out", str(tmp_path / "idx"), "--checkpoint", path,
            "--lr", "1e14", "--dim", "64"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "beyond float16's range; build with --dtype float32" in res.output
    assert not (tmp_path / "idx").exists() or not list((tmp_path / "idx" / "builds").glob("*"))
    ok = CliRunner().invoke(main, [*args, "--dtype", "float32"])
    assert ok.exit_code == 0, ok.output
    assert Store.open(tmp_path / "idx").array("grads").dtype == np.float32


def test_out_paths_that_are_not_indexes(conve_inverse: Trained, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["build", "--model", str(conve_inverse.directory), "--dim", "64"]
    (tmp_path / "notes.txt").write_text("x")
    res = runner.invoke(main, [*base, "--out", str(tmp_path / "notes.txt")])
    assert res.exit_code == 2 and "is a file, not an index directory" in res.output and "Traceback" not in res.output
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    res = runner.invoke(main, [*base, "--out", str(tmp_path / "docs")])
    assert res.exit_code == 2 and "is not a tracin-index index" in res.output
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["a.txt"]
    res = runner.invoke(main, [*base, "--out", str(conve_inverse.directory)])
    assert res.exit_code == 2 and not (conve_inverse.directory / ".lock").exists()
    res = runner.invoke(main, [*base, "--out", "/proc/nope/idx"])
    assert res.exit_code in (1, 2) and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_no_space_while_creating_the_store(conve_inverse: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr.storage._local as local

    original = local._put
    calls = {"n": 0}

    def full(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(local, "_put", full)
    res = CliRunner().invoke(main, ["build", "--model", str(conve_inverse.directory), "--out", str(tmp_path / "idx"),
                                    "--dim", "64"])
    assert res.exit_code == 2 and "no space left on the device" in res.output and "Traceback" not in res.output


def test_checkpoint_directories_of_two_runs_are_refused(tmp_path: Path) -> None:
    from tracin_index.callbacks import CHECKPOINT_FORMAT, find_checkpoints

    state = {"w": torch.zeros(2)}
    for epoch, run in ((1, "a"), (2, "a"), (3, "b")):
        torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "epoch": epoch, "lr": 0.1, "lrs": [0.1],
                    "run_id": run, "state_dict": state}, tmp_path / f"epoch_{epoch:05d}.pt")
    with pytest.raises(InputError, match="mixes checkpoints of 2 training runs"):
        find_checkpoints(tmp_path)
    (tmp_path / "epoch_00003.pt").unlink()
    assert [lr for _, lr in find_checkpoints(tmp_path)] == [0.1, 0.1]


def test_torn_done_flag_is_redone(conve_inverse: Trained, reference: Path, tmp_path: Path) -> None:
    """A kill while the flag chunk itself is written leaves a torn file: that unit is computed again."""
    out = tmp_path / "idx"
    cmd = _build_cmd(conve_inverse, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _done_units(out) < 4:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    [build] = list((out / "builds").iterdir())
    flag = build / "done" / "c" / "2"
    flag.write_bytes(flag.read_bytes()[:3])  # torn: shorter than the chunk plus its checksum
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert _array_bytes(resolve(out)) == _array_bytes(resolve(reference))


def test_per_row_values_are_checked_block_by_block(conve_inverse: Trained, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """verify reads the narrow per-row arrays a block at a time (memory flat in N) and still finds a training
    position that steps back across a block boundary, an id outside the label tables and a self-influence
    that disagrees with the norms, each named once."""
    import tracin_index.verify as verify_module

    out = tmp_path / "idx"
    bundle = load_model(conve_inverse.directory)
    build_index(bundle, out, checkpoints=conve_inverse.checkpoints,
                config=BuildConfig(projection=ProjectionSpec("sparse", 64), unit_rows=400))
    monkeypatch.setattr(verify_module, "VERIFY_BLOCK_ROWS", 400)  # four blocks of one unit each
    store = Store.open(out, complete=False)
    assert store.num_rows > 1200 and verify_module.verify_rows(store) == []
    ti = store.array("train_index")
    ti[800] = int(ti[799])  # the third block starts where the second ended: only the boundary shows it
    num_e = store.array("entity_labels").shape[0]
    triples = store.array("triples")
    triples[1300, 2] = num_e
    si = store.array("self_influence")
    si[500] = float(si[500]) * 2 + 1.0
    problems = verify_module.verify_rows(Store.open(out, complete=False))
    assert sorted(problems) == ["array 'self_influence' disagrees with 'norms' and the learning rates",
                                "array 'train_index' is not increasing within the training triples",
                                "array 'triples' holds ids outside the label tables"]
    # non-finite stored rows (float16 grads checked by their exponent bits, float32 acts by isfinite)
    assert store.array("grads").dtype == np.float16 and "acts" in store.group
    for name, value in (("grads", -np.inf), ("acts", np.nan)):
        row = store.array(name)[1000]
        row[3] = value
        store.array(name)[1000] = row
    problems = verify_module.verify_rows(Store.open(out, complete=False))
    assert {"array 'grads' holds NaN or infinite values", "array 'acts' holds NaN or infinite values"} <= set(problems)
