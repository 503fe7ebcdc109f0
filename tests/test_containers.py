"""docker-compose.yml run for real: podman's Docker-compatible service in the test session's own
network namespace, the image built from ops/Dockerfile on a Debian base made with debootstrap and
the Python packages from a wheelhouse (ops/container-base; /work/shared/RECIPES.md "Containers for
real").  The stack comes up with 3 worker containers, delivers 1,000 messages to a sandbox SMTP
server on the podman bridge (found through a sandbox DNS server there too), each exactly once,
Flower lists the 3 workers, and after one worker container is stopped mid-run its mail is still
delivered.

Marked slow; CI runs it (ops/install-deps --containers prepares the base image and the wheels
while the network is there).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import IN_PRIVATE_NETNS
from tests.fixtures_infra import build_wheel, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("MXQ_BASE_IMAGE", "localhost/mxq-base:bookworm")
IMAGE = "localhost/mxq:test"
PROJECT = "mxqct"
SUBNET, GATEWAY = "10.99.0.0/24", "10.99.0.1"
DNS_PORT = 5353          #: the gateway's port 53 is podman's own DNS (aardvark-dns: container names)
N, DOMAINS = 1000, 20
AUTH = ("ops", "flower-container-pw")
REDIS_PASSWORD = "container-test-pw"


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (ops/install-deps --containers prepares it)")
        pytest.skip(why)


def _try_lock(f, fcntl) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def run(*args, check=True, timeout=300, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args[:4]))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """podman's Docker-compatible service on a socket of ours, inside this session's network namespace."""
    _need(IN_PRIVATE_NETNS and os.geteuid() == 0, "needs root in the test session's private network namespace")
    for exe in ("podman", "docker-compose", "runc"):
        _need(shutil.which(exe) is not None, f"{exe} is not installed")
    env = dict(os.environ, CONTAINERS_CONF=str(ROOT / "ops" / "containers.conf"))
    _need(run("podman", "image", "exists", BASE_IMAGE, check=False, env=env).returncode == 0,
          f"the base image {BASE_IMAGE} is missing (ops/container-base)")
    _need(any((ROOT / "ops" / "wheelhouse").glob("celery-*.whl")), "ops/wheelhouse has no wheels")
    # podman's images, networks and containers are the machine's, not the namespace's: two test
    # sessions at once (parallel checkouts) take turns, and a run killed earlier is cleaned up first.
    import fcntl
    lock = open("/run/lock/mxq-containers-test.lock" if os.path.isdir("/run/lock") else "/tmp/mxq-containers-test.lock",
                "w")
    wait_until(lambda: _try_lock(lock, fcntl), 900, "another session's container test to finish", interval=1)
    d = tmp_path_factory.mktemp("podman")
    sock = d / "podman.sock"
    log = open(d / "service.log", "wb")
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: sock.exists(), 30, "podman's API socket")
        env["DOCKER_HOST"] = f"unix://{sock}"
        leftover = write_env(tmp_path_factory.mktemp("leftover"))
        compose(env, leftover, "down", "-v", "--remove-orphans", check=False, timeout=300)
        yield env
    finally:
        lock.close()
        run("podman", "pod", "prune", "-f", check=False, env=env)
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def image(podman, tmp_path_factory):
    """mxq's image from ops/Dockerfile: the checkout's wheel and the wheelhouse, no network."""
    house = ROOT / "ops" / "wheelhouse"
    for old in house.glob("mxq-*.whl"):
        old.unlink()
    out = tmp_path_factory.mktemp("wheel")
    built = build_wheel(out)        # one build at a time (in the checkout's build/)
    assert built.returncode == 0, built.stderr[-3000:]
    for wheel in out.glob("mxq-*.whl"):
        shutil.copy(wheel, house)
    try:
        run("podman", "build", "--network=none", "-q", "-f", ROOT / "ops" / "Dockerfile",
            "--ignorefile", ROOT / "ops" / "Dockerfile.dockerignore",
            "--build-arg", f"BASE={BASE_IMAGE}", "--build-arg", "MXQ_SPEC=mxq[worker]",
            "--build-arg", "PIP_ARGS=--no-index --find-links /wheels", "-t", IMAGE, ROOT, env=podman, timeout=600)
    finally:
        for built in house.glob("mxq-*.whl"):
            built.unlink()
    r = run("podman", "run", "--rm", "--network=none", IMAGE, "mxq", "--version", env=podman)
    assert r.stdout.startswith("mxq "), r.stdout
    return IMAGE


def write_env(d: Path, **extra) -> Path:
    settings = {
        "MXQ_HELO_NAME": "mxq.containers.test", "FLOWER_BASIC_AUTH": ":".join(AUTH),
        "REDIS_PASSWORD": REDIS_PASSWORD, "MXQ_IMAGE": IMAGE, "MXQ_REDIS_IMAGE": BASE_IMAGE,
        "MXQ_DNS_SERVERS": f"{GATEWAY}:{DNS_PORT}", "MXQ_ALLOW_PRIVATE_DESTINATIONS": "1", "MXQ_TLS": "none",
        "MXQ_LEASE_SECONDS": "6", "MXQ_DISPATCH_STALE": "5", "MXQ_BATCH_SIZE": "16",
        "MXQ_RETRY_SCHEDULE": "2", "MXQ_CONNECT_TIMEOUT": "5", "MXQ_COMMAND_TIMEOUT": "20", **extra}
    (d / ".env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    # The test's own subnet, so the sandbox can listen on the bridge's gateway address.
    (d / "docker-compose.override.yml").write_text(
        f'networks:\n  default:\n    ipam:\n      config:\n        - subnet: "{SUBNET}"\n')
    return d


def compose(env: dict, d: Path, *args, check=True, timeout=300) -> subprocess.CompletedProcess:
    return run("docker-compose", "-p", PROJECT, "--project-directory", d, "-f", ROOT / "docker-compose.yml",
               "-f", d / "docker-compose.override.yml", *args, env=env, check=check, timeout=timeout)


def container_ip(env: dict, name: str) -> str:
    r = run("podman", "inspect", name, env=env)
    nets = json.loads(r.stdout)[0]["NetworkSettings"]["Networks"]
    return next(iter(nets.values()))["IPAddress"]


def flower_workers(ip: str) -> list[str]:
    req = urllib.request.Request(f"http://{ip}:5555/api/workers?refresh=1")
    req.add_header("Authorization", "Basic " + base64.b64encode(":".join(AUTH).encode()).decode())
    with urllib.request.urlopen(req, timeout=20) as r:
        return sorted(json.loads(r.read()))


class HealthChecks(threading.Thread):
    """Runs the project's containers' health checks every 2 s, as systemd timers would for podman
    (there is no systemd here): ``depends_on: condition: service_healthy`` then works."""

    def __init__(self, env: dict):
        super().__init__(daemon=True)
        self.env, self.halt = env, threading.Event()

    def run(self) -> None:
        while not self.halt.wait(2):
            names = run("podman", "ps", "--filter", f"label=com.docker.compose.project={PROJECT}",
                        "--format", "{{.Names}}", check=False, env=self.env, timeout=30).stdout.split()
            for name in names:
                run("podman", "healthcheck", "run", name, check=False, env=self.env, timeout=60)


@pytest.fixture
def health(podman):
    h = HealthChecks(podman)
    h.start()
    yield h
    h.halt.set()
    h.join(70)


def test_the_compose_stack_with_three_workers_delivers_everything_once(podman, image, health, tmp_path,
                                                                       monkeypatch):
    from mxq import tasks
    from mxq.sandbox.dns import start_dns_server
    from mxq.sandbox.smtpd import Behaviour, start_server
    from mxq.tasks.app import rebind

    # Two connections per domain and half a second at the final dot: the run takes about 12 s
    # (1,000 x 0.5 s / 40 connections), so a worker is stopped with mail in flight.
    d = write_env(tmp_path, MXQ_SHAPING="default=2c")
    servers = []
    try:
        compose(podman, d, "up", "-d", "--no-build", "--scale", "worker=3", timeout=600)
        # The bridge exists now: the sandbox listens on its gateway address, reachable from the containers.
        zones = {f"d{i}.containers.test": {"MX": [[10, "mx.containers.test"]]} for i in range(DOMAINS)}
        zones["mx.containers.test"] = {"A": [GATEWAY]}
        servers.append(start_dns_server(zones, host=GATEWAY, port=DNS_PORT, workdir=tmp_path / "dns"))
        sink = start_server(GATEWAY, 25, Behaviour(hostname="mx.containers.test", delays={"data_final": 0.5}))
        servers.append(sink)

        redis_ip = container_ip(podman, f"{PROJECT}_redis_1")
        url = f"redis://:{REDIS_PASSWORD}@{redis_ip}:6379/0"
        monkeypatch.setenv("MXQ_REDIS_URL", url)
        rebind(url)
        wait_until(lambda: _ping(url), 60, "Redis in its container")

        # Flower lists the three workers.
        flower_ip = container_ip(podman, f"{PROJECT}_flower_1")
        workers = wait_until(lambda: _three(flower_ip), 120, "three workers in Flower", interval=1)
        hostnames = {json.loads(run("podman", "inspect", f"{PROJECT}_worker_{i}", env=podman).stdout)[0]
                     ["Config"]["Hostname"] for i in (1, 2, 3)}
        assert workers == sorted(f"mxq@{h}" for h in hostnames), workers

        items = [tasks.Item(f"From: app@app.containers.test\r\nTo: u{i}@d{i % DOMAINS}.containers.test\r\n"
                            f"Subject: {i}\r\nX-Test-Id: {i}\r\n\r\nbody {i}\r\n".encode())
                 for i in range(N)]
        ids = []
        for k in range(0, N, 100):
            ids += tasks.submit_many(items[k:k + 100])
        # Stop one worker container while mail is still on its way.
        wait_until(lambda: len(sink.messages) >= N // 4, 120, "a quarter of the mail at the sink", interval=0.2)
        run("podman", "stop", "-t", "10", f"{PROJECT}_worker_1", env=podman)
        at_stop = len(sink.messages)
        assert at_stop < N, "everything arrived before the worker was stopped: the test proved nothing"
        wait_until(lambda: len(sink.messages) >= N, 300, f"all {N} messages at the sink", interval=0.5)
        time.sleep(2)                                      # anything sent twice would arrive by now
        seen = collections.Counter(int(m.email()["X-Test-Id"]) for m in sink.messages)
        assert sorted(seen) == list(range(N)) and set(seen.values()) == {1}, \
            ([i for i, c in seen.items() if c > 1][:10], len(sink.messages))
        done = collections.Counter(tasks.status(j)["state"] for j in ids)
        assert done == {"done": N}, done
        # The workers logged their deliveries at INFO (the Postfix-style lines) without being asked to.
        r = run("podman", "logs", f"{PROJECT}_worker_2", env=podman)
        logs = r.stdout + r.stderr
        assert "status=sent" in logs or "status=delivered" in logs, logs[-2000:]
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()
        if os.environ.get("MXQ_KEEP_CONTAINERS") != "1":
            compose(podman, d, "down", "-v", "--remove-orphans", check=False, timeout=300)


def _ping(url: str) -> bool:
    import redis
    try:
        return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError:
        return False


def _three(ip: str):
    try:
        w = flower_workers(ip)
    except OSError:
        return None
    return w if len(w) == 3 else None
