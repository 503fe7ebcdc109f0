"""The producer's input contract (``mxq.tasks.submit`` / ``submit_many``) against a real redis-server.

What is refused at submission (``InvalidMessage``, nothing written to Redis) and
what is accepted: a str is message text, never a file name; a file is a
``pathlib.Path`` or an opened file.
"""

from __future__ import annotations

import io
from email.message import EmailMessage

import pytest

from mxq import tasks

TEXT = "From: app@src.submit.test\r\nTo: ann@one.submit.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def redis_url(redis_server, monkeypatch):
    from mxq.tasks.app import rebind

    srv = redis_server()
    monkeypatch.setenv("MXQ_REDIS_URL", srv.url)
    rebind(srv.url)
    client = srv.client()
    yield client
    client.close()


def test_a_str_naming_a_file_is_message_text_and_refused(redis_url, tmp_path):
    """``submit("/etc/passwd")`` never reads the file: a one-line str is malformed message text."""
    path = tmp_path / "m.eml"
    path.write_text(TEXT)
    for name in ("/etc/passwd", str(path)):
        with pytest.raises(tasks.InvalidMessage) as e:
            tasks.submit(name)
        assert "header" in e.value.reason           # it was parsed as a message, and is not one
        with pytest.raises(tasks.InvalidMessage):
            tasks.submit_many([name])
    assert redis_url.keys("mxq:*") == []            # nothing stored, nothing queued
    assert redis_url.llen("mxq.delivery") == 0


def test_a_str_of_message_text_a_path_and_opened_files_are_accepted(redis_url, tmp_path):
    path = tmp_path / "m.eml"
    path.write_text(TEXT)
    jobs = [tasks.submit(TEXT), tasks.submit(path)]
    with open(path, "rb") as f:
        jobs.append(tasks.submit(f))
    with open(path, encoding="utf-8") as f:
        jobs.append(tasks.submit(f))
    jobs += tasks.submit_many([io.BytesIO(TEXT.encode()), {"message": io.StringIO(TEXT)}])
    for job in jobs:
        st = tasks.status(job)
        assert [r["address"] for r in st["recipients"]] == ["ann@one.submit.test"]
        assert b"Subject: hi\r\n" in redis_url.hget(f"mxq:job:{job}", "c")


def test_an_opened_file_over_the_size_limit_is_refused_unread(redis_url, monkeypatch):
    monkeypatch.setenv("MXQ_MAX_MESSAGE_SIZE", "1000")
    big = io.BytesIO(TEXT.encode() + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n")
    with pytest.raises(tasks.InvalidMessage, match="larger than the limit"):
        tasks.submit(big)
    assert big.tell() == 1001                        # read no further than the limit + 1
    assert redis_url.keys("mxq:*") == []


def test_an_email_message_still_works(redis_url):
    m = EmailMessage()
    m["From"] = "app@src.submit.test"
    m["To"] = "bob@one.submit.test"
    m.set_content("x\n")
    assert tasks.status(tasks.submit(m))["recipients"][0]["address"] == "bob@one.submit.test"


def test_more_submissions_at_once_than_the_client_has_connections_wait_their_turn(redis_url):
    """An application submitting from many threads (or greenlets) at once: every submission is
    stored, none fails for want of a connection while Redis is busy (paused 0.5 s while 150
    submissions are under way).  redis-py's default pool opens 100 connections and then
    raises ``MaxConnectionsError`` at once."""
    from tests.fixtures_infra import all_at_once_while_paused

    tasks.submit(TEXT)                      # (the producer's clients exist before the burst)
    n = 150
    jobs, errors = all_at_once_while_paused(redis_url, n, lambda i: tasks.submit(TEXT.replace("hello", f"hello {i}")))
    assert not errors, str(errors[0])
    assert len(set(jobs)) == n
    assert all(tasks.status(j)["recipients"][0]["state"] == "queued" for j in jobs)
