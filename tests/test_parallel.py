"""The parallel test harness (tests/conftest.py, tests/parallel.py), run for real in nested pytest sessions.

- every xdist worker is in a network namespace of its own (not the controller's, not another worker's);
- ``-n auto`` means no workers for one test file, DEFAULT_WORKERS for more, MXQ_TEST_WORKERS when set;
- a ``serial`` test runs while no other test runs, and a run of them is one turn.

The nested sessions run throw-away test files in ``tmp_path`` (outside tests/, so the suite's own
conftest is loaded only where a test asks for it with ``-p``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import parallel

ROOT = Path(__file__).resolve().parents[1]


def _pytest(tmp_path: Path, files: dict[str, str], *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    full_env = dict(os.environ)
    full_env.pop("MXQ_TEST_WORKERS", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


NETNS_TEST = """
import json, os, time
from pathlib import Path

def test_{n}():
    out = Path({out!r}) / f"{{os.getpid()}}.json"
    out.write_text(json.dumps({{"worker": os.environ.get("PYTEST_XDIST_WORKER"),
                                "netns": os.stat("/proc/self/ns/net").st_ino}}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_each_worker_has_a_network_namespace_of_its_own(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files = {f"test_ns{n}.py": NETNS_TEST.format(n=n, out=str(out)) for n in range(2)}
    r = _pytest(tmp_path, files, "-p", "tests.conftest", "-n", "2", "--dist", "loadfile", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = [json.loads(p.read_text()) for p in out.iterdir()]
    assert sorted(s["worker"] for s in seen) == ["gw0", "gw1"], seen
    namespaces = {s["netns"] for s in seen}
    assert len(namespaces) == 2, seen                                  # not each other's
    assert os.stat("/proc/self/ns/net").st_ino not in namespaces       # nor this session's


PLAN_TEST = "def test_one():\n    pass\n"


def _plan(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """What ``-n auto`` decides, without starting workers (--collect-only: the header says it)."""
    return _pytest(tmp_path, {"test_a.py": PLAN_TEST, "test_b.py": PLAN_TEST},
                   "-p", "tests.parallel", "-n", "auto", "--collect-only", *args, env=env)


def test_auto_means_no_workers_for_one_file_and_the_default_for_more(tmp_path):
    one = _pytest(tmp_path, {"test_a.py": PLAN_TEST}, "-p", "tests.parallel", "-n", "auto", str(tmp_path / "test_a.py"))
    assert one.returncode == 0, one.stdout + one.stderr
    assert "mxq: one process (no xdist workers)" in one.stdout and "1 passed" in one.stdout
    node = _plan(tmp_path, f"{tmp_path / 'test_a.py'}::test_one")
    assert "mxq: one process (no xdist workers)" in node.stdout, node.stdout
    for args in ([str(tmp_path)], [str(tmp_path / "test_a.py"), str(tmp_path / "test_b.py")]):
        more = _plan(tmp_path, *args)
        assert more.returncode == 0, more.stdout + more.stderr
        assert f"mxq: {parallel.DEFAULT_WORKERS} xdist workers" in more.stdout, (args, more.stdout)


def test_mxq_test_workers_sets_the_count(tmp_path):
    r = _plan(tmp_path, str(tmp_path), env={"MXQ_TEST_WORKERS": "2"})
    assert r.returncode == 0 and "mxq: 2 xdist workers" in r.stdout, r.stdout + r.stderr
    r = _plan(tmp_path, str(tmp_path), env={"MXQ_TEST_WORKERS": "0"})
    assert r.returncode == 0 and "mxq: one process (no xdist workers)" in r.stdout, r.stdout + r.stderr
    r = _plan(tmp_path, str(tmp_path), env={"MXQ_TEST_WORKERS": "two"})
    assert r.returncode != 0 and "MXQ_TEST_WORKERS='two'" in r.stdout + r.stderr


# Each test writes its [start, end] (monotonic clock, shared by all processes of the machine).
SPAN_TEST = """
import json, os, time
from pathlib import Path
import pytest

OUT = Path({out!r})

def _span(name, seconds):
    start = time.monotonic()
    time.sleep(seconds)          # stands for a test's work
    (OUT / f"{{name}}.json").write_text(json.dumps([start, time.monotonic(), os.environ.get("PYTEST_XDIST_WORKER")]))

{tests}
"""


def test_serial_tests_run_while_no_other_test_runs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ordinary = "\n".join(f"def test_o{i}():\n    _span('o{i}', 0.3)\n" for i in range(12))
    serial = "\n".join(f"@pytest.mark.serial\ndef test_s{i}():\n    _span('s{i}', 0.3)\n" for i in range(3))
    files = {"test_spans.py": SPAN_TEST.format(out=str(out), tests=ordinary + serial + ordinary.replace("o", "p"))}
    # --dist load spreads the one file's tests over the workers, so ordinary tests run on every
    # worker while the serial ones come up.
    r = _pytest(tmp_path, files, "-p", "tests.parallel", "-n", "3", "--dist", "load", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    spans = {p.stem: json.loads(p.read_text()) for p in out.iterdir()}
    assert len(spans) == 27
    assert len({w for _, _, w in spans.values()}) == 3              # the workers really ran side by side
    for name in ("s0", "s1", "s2"):
        start, end, _ = spans[name]
        overlapping = [o for o, (s, e, _) in spans.items() if not o.startswith("s") and s < end and e > start]
        assert overlapping == [], (name, overlapping)
    # The ordinary tests did overlap each other (else the check above proves nothing).
    ordinary_spans = sorted((s, e) for o, (s, e, _) in spans.items() if not o.startswith("s"))
    assert any(b[0] < a[1] for a, b in zip(ordinary_spans, ordinary_spans[1:]))
