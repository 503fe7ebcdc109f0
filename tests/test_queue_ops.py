"""``mxq queue list`` (postqueue -p) and ``mxq queue show`` (postcat), as real subprocesses against a
real redis-server and, for deferred mail, a real ``celery worker`` delivering to a domain whose
exchange refuses connections (tests/test_queue_cli.py's domains).
"""

from __future__ import annotations

import json
import re

from mxq import tasks
from mxq.tasks.store import get_store
from tests.fixtures_infra import wait_until
from tests.test_queue_cli import DEAD, OK, deferred, message, mxq, sink  # noqa: F401  (fixture)

pytest_plugins = ["tests.pipeline_fixtures"]


def test_queue_list_and_show(pipeline, sink):   # noqa: F811
    p = pipeline()
    w = p.worker(concurrency=1, MXQ_RETRY_SCHEDULE="600")
    stuck = tasks.submit(message(f"a@{DEAD}", "stuck"), recipients=[f"a@{DEAD}"])
    wait_until(lambda: deferred(stuck), 20, "the dead domain's recipient deferred")
    w.stop()
    ready = [tasks.submit(message(f"u{i}@{OK}", f"r{i}"), recipients=[f"u{i}@{OK}"]) for i in range(2)]
    both = tasks.submit(message(f"b@{OK}", "both"), recipients=[f"b@{OK}", f"c@{DEAD}"])
    (held,) = get_store().claim(OK, "operator-test-token", limit=1)            # in flight now
    assert held.job == ready[0]

    r = mxq("queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    jobs = json.loads(r.stdout)
    assert [j["job"] for j in jobs] == [stuck, *ready, both]                 # oldest first
    by = {j["job"]: j for j in jobs}
    assert [(x["address"], x["state"]) for x in by[stuck]["recipients"]] == [(f"a@{DEAD}", "deferred")]
    assert by[stuck]["recipients"][0]["attempts"] == 1 and by[stuck]["recipients"][0]["enhanced"].startswith("4.")
    assert [x["state"] for x in by[ready[0]]["recipients"]] == ["active"]
    assert [x["state"] for x in by[ready[1]]["recipients"]] == ["queued"]
    assert by[both]["sender"] == "ops@src.q.test" and by[both]["size"] > 0
    assert [x["address"] for x in by[both]["recipients"]] == [f"b@{OK}", f"c@{DEAD}"]

    only = json.loads(mxq("queue", "list", "--json", "--domain", DEAD.upper()).stdout)
    assert [(j["job"], [x["address"] for x in j["recipients"]]) for j in only] == [
        (stuck, [f"a@{DEAD}"]), (both, [f"c@{DEAD}"])]
    assert [j["job"] for j in json.loads(mxq("queue", "list", "--json", "--state", "active").stdout)] == [ready[0]]
    assert [j["job"] for j in json.loads(mxq("queue", "list", "--json", "--state", "deferred").stdout)] == [stuck]

    text = mxq("queue", "list").stdout.decode()
    lines = text.splitlines()
    assert lines[0].split() == ["JOB", "SIZE", "AGE", "SENDER", "RECIPIENT", "STATE", "TRIES", "LAST", "REPLY"]
    assert re.search(rf"^{stuck}\s+\d+\s+\S+\s+ops@src\.q\.test\s+a@{re.escape(DEAD)}\s+deferred\s+1\s+4", text, re.M)
    assert re.search(rf"^\s+c@{re.escape(DEAD)}\s+queued\s*$", text, re.M), text     # second row of a job
    assert lines[-1] == "-- 4 job(s), 5 recipient(s), " + str(sum(j["size"] for j in jobs)) + " octets"
    assert mxq("queue", "list", "--domain", "bad..domain").returncode == 65

    r = mxq("queue", "show", both)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert f"*** ENVELOPE RECORDS {both} ***" in out and "sender: ops@src.q.test" in out
    assert re.search(rf"^b@{re.escape(OK)}\s+queued", out, re.M) and re.search(rf"^c@{re.escape(DEAD)}\s+queued", out, re.M)
    body = out.split(f"*** MESSAGE CONTENTS {both} ***\n", 1)[1]
    assert body.startswith("From: ops@src.q.test\nTo: ") and "Subject: both\n" in body
    assert out.rstrip().endswith(f"*** END OF MESSAGE {both} ***")
    doc = json.loads(mxq("queue", "show", "--json", stuck).stdout)
    assert doc["recipients"][0]["state"] == "deferred" and "Subject: stuck" in doc["content"]
    assert "MESSAGE CONTENTS" not in mxq("queue", "show", "--no-content", both).stdout.decode()
    assert mxq("queue", "show", "0" * 32).returncode == 66
    assert mxq("queue", "show", "nope").returncode == 66

    # flush JOB (postqueue -i): that job's deferred work goes back to its ready list now
    client = p.redis.client()
    assert client.zcard("mxq:deferred") == 1
    r = mxq("queue", "flush", stuck, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"moved": 1, "job": stuck}, r.stderr
    assert client.zcard("mxq:deferred") == 0
    assert [w.decode().split("|")[0] for w in client.lrange(f"mxq:ready:{DEAD}", 0, -1)] == [both, stuck]
    assert json.loads(mxq("queue", "flush", stuck, "--json").stdout) == {"moved": 0, "job": stuck}
    assert mxq("queue", "flush", "f" * 32).returncode == 66
    client.close()
