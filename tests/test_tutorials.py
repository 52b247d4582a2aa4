"""Every tutorial is a runnable script: execute each one as the docs' readers would."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


def test_there_is_a_tutorial():
    assert TUTORIALS, "tutorials/*.py is empty"


@pytest.mark.parametrize("path", TUTORIALS, ids=[path.name for path in TUTORIALS])
def test_tutorial_runs(path):
    # a fresh namespace each time; any exception fails
    runpy.run_path(str(path), run_name="__main__")
