"""Smoke test of the benchmark (issue 5): ``ops/bench --quick`` end to end, as CI runs it.

One real run (200 messages of 2 KB to 5 domains, every stage: the
smtp-source -> smtp-sink limit, django-celery-email, Postfix, mxq) in its own
private network namespace, then checks on the JSON it wrote: every field is
there, every stage ran, every message reached the sinks exactly once (by
smtp-sink's own counters and by message identity), and the figures are
sane.  The figures themselves are not asserted: the machine is shared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ops"))

from bench_lib.report import RATIOS, STAGE_ORDER  # noqa: E402
from bench_lib.stages import REDIS_FIELDS, RESULT_FIELDS, SINK_FIELDS  # noqa: E402

N, M = 200, 5

pytestmark = [pytest.mark.postfix, pytest.mark.timeout(170)]


def _skip_unless_runnable(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (private netns, port 25)")
    missing = [t for t in tools if not (shutil.which(t) or os.path.exists(f"/usr/sbin/{t}"))]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (postfix, redis-server, util-linux packages)")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Run ``ops/bench --quick`` once; return (exit status, output, parsed JSON)."""
    _skip_unless_runnable("smtp-sink", "smtp-source", "postfix", "redis-server", "unshare")
    out = tmp_path_factory.mktemp("bench") / "result.json"
    # No installing from inside the test session's network namespace: ops/test (install-deps)
    # has installed everything, the bench extra included (it is part of the test extra).
    env = dict(os.environ, MXQ_BENCH_SKIP_INSTALL="1")
    proc = subprocess.run([str(ROOT / "ops" / "bench"), "--quick", "--json", str(out)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=160, stdin=subprocess.DEVNULL)
    text = proc.stdout + proc.stderr
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{text[-4000:]}"
    return proc.returncode, text, json.loads(out.read_text())


def test_run_succeeds_and_prints_the_table(bench):
    code, text, result = bench
    assert code == 0, text[-4000:]
    assert result["ok"] is True
    for label in ("smtp-source -> smtp-sink (limit)", "django-celery-email 3.0", "Postfix end to end", "mxq"):
        assert label in text
    for key, _ in RATIOS:
        assert key in text


def test_params_are_the_quick_ones(bench):
    _, _, result = bench
    p = result["params"]
    assert (p["messages"], p["domains"], p["size"], p["quick"]) == (N, M, 2048, True)
    assert result["environment"]["cpus"] >= 1 and result["environment"]["postfix"]


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_stage_ran_and_is_exactly_once(bench, stage):
    _, text, result = bench
    st = result["stages"][stage]
    assert set(st) == set(RESULT_FIELDS)
    assert st["status"] == "ok", st["error"]
    assert st["error"] is None
    sinks = st["sinks"]
    assert set(sinks) == set(SINK_FIELDS)
    # Exactly once, three ways: smtp-sink's own counters, the dump records, and distinct ids.
    assert sinks["smtp_sink_counter"] == N
    assert sinks["records"] == N
    assert sinks["unique_ids"] == N
    assert (sinks["duplicates"], sinks["missing"], sinks["unexpected"]) == (0, 0, 0)
    assert sinks["exactly_once"] is True
    # The messages are the requested size (plus smtp-sink's own few header lines).
    assert 2048 <= sinks["bytes_per_record"] <= 2048 + 800
    assert st["messages"] == N
    assert st["seconds"] > 0 and st["msgs_per_sec"] > 0
    assert abs(st["msgs_per_sec"] * st["seconds"] - N) < 0.01 * N


@pytest.mark.parametrize("stage", ["django_celery_email", "postfix", "mxq"])
def test_latency_is_measured(bench, stage):
    lat = bench[2]["stages"][stage]["latency_ms"]
    assert lat["samples"] == N
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    # Nothing is delivered later than the stage's last delivery.
    assert lat["max"] <= bench[2]["stages"][stage]["seconds"] * 1000 + 50


def test_dns_queries_are_counted(bench):
    stages = bench[2]["stages"]
    # Postfix and mxq route by MX, so they ask the sandbox DNS server; the others never do.
    assert stages["postfix"]["dns_queries"] >= M
    assert stages["mxq"]["dns_queries"] >= M
    assert stages["limit"]["dns_queries"] == 0
    assert stages["django_celery_email"]["dns_queries"] == 0


@pytest.mark.parametrize("stage", ["django_celery_email", "mxq"])
def test_redis_and_worker_figures(bench, stage):
    st = bench[2]["stages"][stage]
    redis = st["redis"]
    assert set(redis) == set(REDIS_FIELDS)
    assert redis["commands_total"] > 0 and redis["commands_per_message"] > 0
    assert redis["memory_per_queued_message"] > 0 and redis["memory_probe_messages"] > 0
    # Celery prefork -c 2: a main process and its two pool children, each with a peak RSS.
    assert len(st["workers"]) >= 3
    assert all(w["peak_rss_kb"] > 1000 for w in st["workers"])


def test_ratios(bench):
    result = bench[2]
    mxq = result["stages"]["mxq"]["msgs_per_sec"]
    for key, other in RATIOS:
        ratio = result["ratios"][key]
        assert ratio is not None and ratio > 0
        assert ratio == pytest.approx(mxq / result["stages"][other]["msgs_per_sec"], rel=0.01)


# --------------------------------------------------------------------------- the counting itself


def _send(host: str, msgs: list[bytes]) -> None:
    import smtplib
    with smtplib.SMTP(host, 25, local_hostname="client.bench.test", timeout=10) as s:
        for m in msgs:
            s.sendmail("a@sender.bench.test", ["u@d0.bench.test"], m)


@pytest.fixture
def workdir():
    """A directory smtp-sink (running as nobody) can write below, removed afterwards."""
    _skip_unless_runnable("smtp-sink")
    from bench_lib.sandbox import make_workdir
    d = make_workdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_sinks_refuse_a_directory_nobody_can_reach(tmp_path):
    _skip_unless_runnable("smtp-sink")
    from bench_lib.sandbox import BenchError, SinkFarm
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(BenchError, match="not searchable"):
        SinkFarm(["127.1.0.1"], private / "sinks").start()


def test_monitor_counts_exactly_and_catches_duplicates(workdir):
    """A real smtp-sink and the monitor: a duplicate, a message without id and latency are all seen."""
    from bench_lib.messages import Spec
    from bench_lib.sandbox import Monitor, SinkFarm, last_counter, stop_all

    spec = Spec("t", 5, 1, 600)
    farm = SinkFarm(["127.1.0.1", "127.1.0.2"], workdir / "sinks")
    try:
        farm.start()
        mon = Monitor(farm, expected=7).start()
        msgs = [spec.render(i) for i in range(5)]
        _send("127.1.0.1", msgs[:3])
        _send("127.1.0.2", msgs[3:] + [msgs[1], b"Subject: no id\r\n\r\nbody\r\n"])   # 1 is sent twice
        done = mon.wait_complete(10)
        farm.stop()
        tally = mon.finish()
    finally:
        stop_all()
    assert done > 0
    assert tally["records"] == 7 == farm.counter_total()
    assert [last_counter(s.counters) for s in farm.sinks] == [3, 4] == tally["per_sink_records"]
    assert sorted(tally["ids"]) == sorted(spec.ids())
    assert tally["duplicates"] == 1 and tally["duplicate_ids"] == ["t-1"]
    assert len(tally["latencies"]) == 5 and all(0 <= x < 10 for x in tally["latencies"])


def test_dump_reader_handles_records_split_across_reads(tmp_path):
    """Records (and the separator itself) cut at arbitrary points between two reads are counted once."""
    from bench_lib.sandbox import SEPARATOR, _Tail, _Tally

    records = "".join(f"\n{SEPARATOR}\nX-Client-Addr: 127.0.0.1\nX-Bench-Id: r-{i}\nX-Bench-Submitted: 100.5\n"
                      f"\nbody line {i}\nX-Bench-Id: not-a-header-{i}\n\n" for i in range(50))
    for cut_every in (1, 7, 64, 4096):
        path = tmp_path / f"dump{cut_every}"
        path.write_text("")
        tail, tally = _Tail(str(path), "X-Bench-Id", "X-Bench-Submitted"), _Tally()
        with open(path, "a") as f:
            for k in range(0, len(records), cut_every):
                f.write(records[k:k + cut_every])
                f.flush()
                tail.read(200.0, tally)
        assert tally.records == 50 and tail.records == 50
        assert sorted(tally.first_seen) == sorted(f"r-{i}" for i in range(50))   # body lines ignored
        assert not tally.duplicates
        assert set(tally.submitted.values()) == {100.5}


def test_percentile_is_nearest_rank():
    from bench_lib.sandbox import percentile
    assert percentile(list(range(1, 101)), 0.5) == 50
    assert percentile(list(range(1, 101)), 0.99) == 99
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) is None


def test_json_output_never_replaces_a_special_file(tmp_path):
    """``--json /dev/null`` must write into the device, not rename a regular file over it."""
    from bench_lib.sandbox import json_dump
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    import threading
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    json_dump({"a": 1}, fifo)
    reader.join(10)
    assert fifo.is_fifo() and json.loads(got[0]) == {"a": 1}
    regular = tmp_path / "r.json"
    json_dump({"b": 2}, regular)
    assert json.loads(regular.read_text()) == {"b": 2} and not (tmp_path / "r.json.tmp").exists()
