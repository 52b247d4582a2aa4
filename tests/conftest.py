"""Shared test setup: hypothesis profiles, the `gpu` marker, and tests that wait for a task.

In the student copy (`minipaged assignment DEST`) the tasks' bodies are stubs that raise
NotImplementedError("task 1.3: write this body ..."). A test of a task fails on its stub, as it
should. A test of no task (the engine, the tutorials) that runs into a stub tests nothing yet: it is
reported as skipped, with the task it waits for, so that `make test` in the copy fails only in the
tasks' own tests. In the reference there are no stubs and this never happens.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" runs more examples and never times out on a slow shared machine; "dev" is the quick default.
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)

# The test models are tiny: torch's intra-op threads only fight over the cores (on a 2-core machine the
# engine tests ran several times slower with the default thread count).
torch.set_num_threads(1)


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Skip `gpu`-marked tests cleanly, with the reason, when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# the stub's message (minipaged/assignments.py: stub)
_STUB = re.compile(r"task (\d+\.\d+): write this body")


def _stub_hit(error: BaseException | None) -> str | None:
    """The task whose stub `error` comes from, if any.

    The stub's NotImplementedError may be the error itself, one it chains from, one of a group
    (hypothesis raises groups), or only its message: a subprocess's traceback quoted in an
    assertion.
    """
    seen, pending = set(), [error]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        match = _STUB.search(str(error))
        if match:
            return match[1]
        pending += [error.__cause__, error.__context__]
        # an exception group's members (BaseExceptionGroup is Python 3.11+)
        pending += list(getattr(error, "exceptions", ()))
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A test of no task that fails on a task's stub is reported skipped, naming the task."""
    report = (yield).get_result()
    if not report.failed or call.excinfo is None:
        return
    if any(mark.name.startswith("task") for mark in item.iter_markers()):
        return  # a task's own test: its failure is the point
    task = _stub_hit(call.excinfo.value)
    if task is not None:
        report.outcome = "skipped"
        path, line, _ = item.location
        report.longrepr = (
            path,
            (line or 0) + 1,
            f"waits for task {task} (still a stub)",
        )
