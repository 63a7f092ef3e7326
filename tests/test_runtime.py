"""Process settings: the allocator keeps large freed blocks, so a batch's activations are not page-faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# ConvE's 2D encoder over one build batch (2048 rows): three 85 MB tensors per pass, as in every batch
PROBE = """
import resource, torch
from tracin_index.backend import tune_allocator
tuned = tune_allocator()
x = torch.randn(2048, 1, 20, 20)
conv, bn = torch.nn.Conv2d(1, 32, 3).eval(), torch.nn.BatchNorm2d(32).eval()
with torch.no_grad():
    for i in range(8):
        if i == 2:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = torch.relu(bn(conv(x)))
        del y
print(tuned, tune_allocator(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env: dict[str, str]) -> tuple[str, str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], out[1], int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_tuned_allocator_reuses_large_blocks_and_can_be_turned_off() -> None:
    tuned, again, faults = _probe({})
    assert (tuned, again) == ("True", "True")
    untuned, again, system_faults = _probe({"TRACIN_INDEX_MALLOC": "system"})
    assert (untuned, again) == ("False", "False")
    assert _probe({"TRACIN_INDEX_BACKEND": "plain"})[:2] == ("False", "False"), "the plain backend tunes nothing"
    # glibc's default maps and unmaps every 85 MB tensor: 18 of them, 20k page faults each
    assert system_faults > 200_000
    assert faults * 5 < system_faults  # tuned: the passes after the warm-up reuse the heap, not fresh pages


def test_the_library_leaves_the_allocator_alone_unless_asked() -> None:
    """Importing the package, building and opening never tune the process; the CLI's thread setup does."""
    code = ("import tracin_index, tracin_index.build, tracin_index.query, tracin_index.cli; from tracin_index import backend; "
            "print(backend._tuned); from tracin_index.runtime import configure_threads; configure_threads(1); "
            "print(backend._tuned); configure_threads(1, tune_allocator=True); print(backend._tuned)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["None", "None"]
    assert out[2] == str(sys.platform.startswith("linux"))
