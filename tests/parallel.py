"""Parallel runs (pytest-xdist): how many workers, and tests that must run alone.

Registered from ``tests/conftest.py`` (``pytest_plugins``), which also moves
every process -- the xdist controller and each worker -- into a network
namespace of its own.

Workers.  ``ops/test`` passes ``-n auto --dist loadfile``; ``-n auto`` means
``MXQ_TEST_WORKERS`` when set (0: no workers, one process), else none for a run
over one test file (xdist's start-up, a full collection per worker, costs more
than it gains there), else ``DEFAULT_WORKERS``.  ``loadfile`` keeps each test
file on one worker, in file order, as a serial run would: a file's
module-scoped servers start once, on fixed addresses of that worker's
namespace.

``@pytest.mark.serial``: the test runs while no other test runs.  For tests
that measure (the benchmark smoke test) or need most of the machine: a worker
about to run one waits until every other worker has finished the test it is
running, and the others start nothing new until it is done; consecutive serial
tests of one worker (a whole marked module) are one such turn.  Implemented
with two ``flock(2)`` locks shared by the workers of one run (a fair
readers-writer lock: a "turnstile" that a waiting serial test holds, so
ordinary tests cannot starve it, and the "run" lock, shared by ordinary
tests, exclusive for serial ones).  Without workers the marker changes
nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

#: Workers for a run over more than one test file, unless MXQ_TEST_WORKERS says otherwise.
#: Measured in README "Development": the suite mostly waits (servers, timeouts, Celery
#: processes), so 4 workers fit 2 cores; 6 overload them.
DEFAULT_WORKERS = 4

#: Bound on waiting for a turn (the longest serial run, or the longest ordinary test).
LOCK_WAIT_SECONDS = 600.0


# --------------------------------------------------------------------------- how many workers

def _test_files(config) -> int | None:
    """How many test files the command line names; None for a folder (or no paths: testpaths)."""
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        return None
    files = set()
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::", 1)[0])
        if not path.is_file():
            return None
        files.add(path.resolve())
    return len(files)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``, in the controller only (``-n N`` bypasses it): see the module docstring.

    tryfirst: before xdist's own answer (the CPU count), whichever plugin was registered first."""
    wanted = os.environ.get("MXQ_TEST_WORKERS", "").strip()
    if wanted:
        try:
            return max(0, int(wanted))
        except ValueError:
            raise pytest.UsageError(f"MXQ_TEST_WORKERS={wanted!r}: a whole number of xdist workers (0: none)")
    if _test_files(config) == 1:
        return 0
    return DEFAULT_WORKERS


def pytest_report_header(config):
    workers = getattr(config.option, "numprocesses", None)
    netns = os.environ.get("MXQ_IN_TEST_NETNS") == "1"
    if workers:
        where = "each in a private network namespace of its own" if netns else "in the host's network namespace"
        return (f"mxq: {workers} xdist workers (--dist {config.option.dist}), {where}; "
                "MXQ_TEST_WORKERS=N for N workers, 0 for none")
    where = "in a private network namespace" if netns else "in the host's network namespace"
    return f"mxq: one process (no xdist workers), {where}"


# --------------------------------------------------------------------------- serial tests

class _RunLock:
    """The fair readers-writer lock of one run, over two lock files in ``directory``."""

    def __init__(self, directory: str):
        self.turnstile = os.open(os.path.join(directory, "turnstile.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self.run = os.open(os.path.join(directory, "run.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self.exclusive = False          # this worker holds the run lock exclusively (a serial turn)

    @staticmethod
    def _lock(fd: int, mode: int, what: str) -> None:
        """flock with a bound: poll without blocking (a blocked flock cannot be bounded)."""
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"tests/parallel.py: waited {LOCK_WAIT_SECONDS:g} s for {what}") from None
                time.sleep(0.02)

    def shared(self, nodeid: str) -> None:
        """Before an ordinary test: wait out any serial turn, queued or running."""
        self._lock(self.turnstile, fcntl.LOCK_EX, f"a serial test's turn to end before {nodeid}")
        try:
            self._lock(self.run, fcntl.LOCK_SH, f"a serial test's turn to end before {nodeid}")
        finally:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)

    def take_turn(self, nodeid: str) -> None:
        """Before a serial test: stop new tests starting, then wait for the running ones to end."""
        self._lock(self.turnstile, fcntl.LOCK_EX, f"the turnstile for serial {nodeid}")
        self._lock(self.run, fcntl.LOCK_EX, f"every other worker's test to end before serial {nodeid}")
        self.exclusive = True

    def release(self) -> None:
        fcntl.flock(self.run, fcntl.LOCK_UN)
        if self.exclusive:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)
            self.exclusive = False


def _serial(item) -> bool:
    return item is not None and item.get_closest_marker("serial") is not None


_LOCK_DIR_KEY = "mxq_run_lock_dir"
_lock: _RunLock | None = None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """Controller: every worker of the run gets the one lock directory."""
    config = node.config
    if not hasattr(config, "_mxq_run_lock_dir"):
        config._mxq_run_lock_dir = tempfile.mkdtemp(prefix="mxq-pytest-run-")
    node.workerinput[_LOCK_DIR_KEY] = config._mxq_run_lock_dir


def pytest_unconfigure(config):
    directory = getattr(config, "_mxq_run_lock_dir", None)
    if directory:                       # the controller, after every worker is gone
        shutil.rmtree(directory, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Worker: a shared turn for each ordinary test; one exclusive turn for consecutive serial tests.

    The outermost wrapper (tryfirst), so waiting for a turn is not counted in
    the test's own pytest-timeout.
    """
    global _lock
    workerinput = getattr(item.config, "workerinput", None)
    if not workerinput or _LOCK_DIR_KEY not in workerinput:
        return (yield)
    if _lock is None:
        _lock = _RunLock(workerinput[_LOCK_DIR_KEY])
    serial = _serial(item)
    if serial and not _lock.exclusive:
        _lock.take_turn(item.nodeid)
    elif not serial:
        _lock.shared(item.nodeid)
    try:
        return (yield)
    finally:
        if not (serial and _serial(nextitem)):      # a serial turn lasts while serial tests follow
            _lock.release()
