"""The package's face: registries as the one source of names, errors in the caller's spelling, a light import
and command-line help, the generated CLI reference."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import tracin_index
from tracin_index import LOSSES, BuildConfig, InputError, ProjectionSpec
from tracin_index.atomic import replacing
from tracin_index.cli import main
from tracin_index.cli.reference import COLUMNS, reference
from tracin_index.errors import arg, spelled
from tracin_index.registry import FORMATS, MODES, PROJECTIONS, REGISTRIES, SEARCHES, STRATEGIES, format_for

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tracin_index"


def test_docs_cli_reference_is_generated_from_the_commands() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    assert text == reference(), "docs/cli.md is stale: python -m tracin_index.cli.reference > docs/cli.md"
    for registry in REGISTRIES:
        for entry in registry:
            assert f"| `{entry.name}` | {entry.help} |" in text
    for command in main.commands:
        assert f"## `{command}`" in text
    from tracin_index.rankings import COLUMN_TYPES, result_columns

    assert set(COLUMNS) == set(result_columns(predictions=True)) == set(COLUMN_TYPES)


def test_no_copies_of_the_registries_names() -> None:
    """No line outside registry.py quotes most of one registry's names: the CLI's choices, the checks and the
    help texts take them from the registry."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "registry.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            quoted = set(re.findall(r"[\"']([a-z0-9.]+)[\"']", line))
            for registry in REGISTRIES:
                names = set(registry.names) | {e["suffix"] for e in registry if "suffix" in e.properties}
                if len(quoted & names) >= min(3, len(registry)):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_choices_and_checks_come_from_the_registries() -> None:
    build = main.commands["build"]
    choices = {p.name: tuple(p.type.choices) for p in build.params if hasattr(p.type, "choices")}
    assert choices["loss"] == LOSSES.names and choices["projection"] == PROJECTIONS.names
    assert choices["stratify"] == STRATEGIES.names
    query = {p.name: tuple(p.type.choices) for p in main.commands["query"].params if hasattr(p.type, "choices")}
    assert query["mode"] == MODES.names and query["search"] == SEARCHES.names
    for registry in (LOSSES, PROJECTIONS, FORMATS):  # every named implementation exists
        for entry in registry:
            assert callable(entry.load()) or hasattr(entry.load(), "write")
    from tracin_index.losses import get_loss

    assert [get_loss(n).name for n in LOSSES.names] == list(LOSSES.names)
    with pytest.raises(InputError, match=r"^loss='hinge' is unknown; choose one of bce, ce, score$"):
        BuildConfig(loss="hinge").check()
    with pytest.raises(InputError, match=r"^projection='dense' is unknown; choose one of sparse, gaussian, none$"):
        BuildConfig(projection=ProjectionSpec("dense")).check()
    with pytest.raises(InputError, match=r"^stratify='entity' is unknown"):
        BuildConfig(stratify="entity").check()
    assert format_for("a/b.PARQUET").name == "parquet" and format_for("x.json").name == "json"
    with pytest.raises(InputError, match=r"^out='x.json': the extension picks the format; use .parquet or .jsonl$"):
        format_for("x.json", tables_only=True)


def test_errors_spell_arguments_for_their_reader() -> None:
    exc = InputError(f"{arg('k', 0)} is out of range; try {arg('loss', 'score')}, {arg('force', True)}, "
                     f"{arg('layers')} or " + spelled("checkpoints=[...]", "--checkpoint FILE"))
    assert str(exc) == "k=0 is out of range; try loss='score', force=True, layers or checkpoints=[...]"
    flags = {"k": "--top-k"}
    assert exc.render(lambda n: flags.get(n, "--" + n)) == (
        "--top-k 0 is out of range; try --loss score, --force, --layers or --checkpoint FILE")
    with pytest.raises(InputError, match=r"^dim=0 is out of range"):
        BuildConfig(projection=ProjectionSpec(dim=0)).check()
    with pytest.raises(InputError, match=r"^batch_size=0 must be at least 1$"):
        BuildConfig(batch_size=0).check()


def test_cli_names_its_own_flags(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["build", "--model", str(tmp_path), "--out", str(tmp_path / "i"), "--sample-rate", "2"])
    assert res.exit_code == 2 and res.output.strip() == "Error: --sample-rate 2.0 is out of range; choose a fraction in (0, 1]"
    res = runner.invoke(main, ["build", "--model", str(tmp_path), "--out", str(tmp_path / "i"), "--gradient-memory", "0"])
    assert res.exit_code == 2 and "--gradient-memory" in res.output
    res = runner.invoke(main, ["build", "--model", str(tmp_path), "--out", str(tmp_path / "i"), "--loss", "hinge"])
    assert res.exit_code == 2 and "'hinge' is not one of 'bce', 'ce', 'score'" in res.output
    assert not (tmp_path / "i").exists()


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout


def test_import_and_help_load_nothing_heavy() -> None:
    heavy = ("torch", "faiss", "pykeen", "numpy", "zarr")
    code = (
        "import sys\n"
        "import tracin_index\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
        "from tracin_index.cli import main\n"
        "for args in (['--help'], *([c, '--help'] for c in main.commands)):\n"
        "    try:\n"
        "        main(args, prog_name='tracin-index')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    lines = _fresh(code).strip().splitlines()
    assert lines[0] == "[]" and lines[-1] == "[]"
    assert "Usage: tracin-index build" in "\n".join(lines)


def test_lazy_exports_are_the_public_names() -> None:
    assert set(tracin_index.__all__) - {"__version__"} == set(tracin_index._EXPORTS)
    for name in tracin_index.__all__:
        assert getattr(tracin_index, name) is not None
    with pytest.raises(AttributeError):
        tracin_index.no_such_name  # noqa: B018


def test_replacing_writes_whole_files_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with replacing(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
