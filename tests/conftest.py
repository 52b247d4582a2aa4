"""Shared test setup: hypothesis profiles, the `gpu` marker, and tests that wait for a task.

In the student copy (`minipaged assignment DEST`) the tasks' bodies are stubs that raise
NotImplementedError("task 1.3: write this body ..."). A test of a task fails on its stub, as it
should. A test of no task (the engine, the tutorials) that runs into a stub tests nothing yet: it is
reported as skipped, with the task it waits for, so that `make test` in the copy fails only in the
tasks' own tests. Tests whose stub errors cannot be seen (a server, a subprocess) are marked
`needs_every_task` and skipped up front while any stub is left. In the reference there are no
stubs and neither ever happens (tests/test_assignments.py checks both in a copy).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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
    """Skip, with the reason: `gpu` tests without a CUDA device, and `needs_every_task` tests
    while a task of the package under test is still a stub (the student copy)."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device (none found)")
    stubs = stubbed_tasks()
    _STUBS_LEFT[:] = stubs
    if stubs:
        reason = f"needs every task; still stubs: task {', '.join(stubs)}"
        skips["needs_every_task"] = pytest.mark.skip(reason=reason)
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


# the stub's message (minipaged/assignments.py: stub)
_STUB = re.compile(r"task (\d+\.\d+): write this body")
# the tasks still stubs in the package under test (set at collection): none in the reference
_STUBS_LEFT: list[str] = []


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
    if not _STUBS_LEFT:
        return  # the reference: every failure is a failure
    task = _stub_hit(call.excinfo.value)
    if task is not None:
        report.outcome = "skipped"
        path, line, _ = item.location
        report.longrepr = (
            path,
            (line or 0) + 1,
            f"waits for task {task} (still a stub)",
        )


def stubbed_tasks() -> list[str]:
    """The tasks whose fences still hold a stub in the minipaged being tested: none in the
    reference. A server or a subprocess hides a stub's error from the hook above, so the tests
    marked `needs_every_task` are skipped up front while any stub is left."""
    import minipaged

    found = set()
    for path in Path(minipaged.__file__).parent.rglob("*.py"):
        if path.name != "assignments.py":  # its docstring shows a stub, as an example
            found |= set(_STUB.findall(path.read_text()))
    return sorted(found, key=lambda task: tuple(map(int, task.split("."))))
