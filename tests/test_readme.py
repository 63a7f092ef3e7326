"""The README's Python quick start runs as written (on a test model instead of the demo's)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from tracin_index import Influence, QueryResult

from .conftest import Trained

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_quick_start_runs(conve_inverse: Trained, tmp_path: Path) -> None:
    text = README.read_text()
    [code] = re.findall(r"## Python quick start\n\n```python\n(.*?)```", text, re.S)
    assert 8 <= len(code.strip().splitlines()) <= 14
    # the demo's files -> the session's test model (its checkpoints carry no lr of their own, so they come as pairs)
    code = code.replace('find_checkpoints("demo-out/checkpoints")', repr(conve_inverse.checkpoints))
    code = code.replace('"demo-out/model"', repr(str(conve_inverse.directory)))
    code = code.replace('"demo-out/idx"', repr(str(tmp_path / "idx")))
    assert "demo-out" not in code
    scope: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), scope)
    result, scores = scope["result"], scope["scores"]
    assert isinstance(result, QueryResult) and result.test == {"head": "brazil", "relation": "commonbloc1", "tail": "india"}
    assert isinstance(result.proponents[0], Influence) and len(result.proponents) <= 5
    assert isinstance(scores, pd.DataFrame) and scores["test_index"].nunique() == len(conve_inverse.testing)
