"""Process settings: the allocator keeps large freed blocks, so a batch's activations are not page-faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from tracin_index.runtime import tune_allocator
tuned = tune_allocator()
def faults_of_second_pass():
    for i in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(25_000_000)  # 100 MB, well above glibc's 32 MiB mmap ceiling
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(tuned, tune_allocator(), faults_of_second_pass())
"""


def _probe(env: dict[str, str]) -> tuple[str, str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], out[1], int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_tuned_allocator_reuses_large_blocks_and_can_be_turned_off() -> None:
    tuned, again, faults = _probe({})
    assert (tuned, again) == ("True", "True")
    assert faults < 1000  # the 24k pages of the second 100 MB tensor come from the kept heap
    tuned, again, faults = _probe({"TRACIN_INDEX_MALLOC": "system"})
    assert (tuned, again) == ("False", "False")
    assert faults > 20000  # glibc's default: a fresh mmap, every page faulted in again
