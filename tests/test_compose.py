"""docker-compose.yml and ops/Dockerfile: valid, scalable, and every command they run exists.

There is no Docker engine on the test machines: Compose v1 (Debian's
``docker-compose``) validates and normalises the file offline
(``docker-compose config``), and the commands the services run are checked
against this checkout's ``mxq`` entry point.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "ops" / "Dockerfile"
MXQ = str(Path(sys.executable).with_name("mxq"))
MXQ_SERVICES = ("worker", "scheduler", "flower")


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("docker-compose is missing (ops/install-deps installs it)")
        pytest.skip("docker-compose is not installed (ops/install-deps installs it)")
    return exe


def _compose(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([_docker_compose(), "-f", str(COMPOSE), *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    """The normalised configuration (``docker-compose config``), as a dict, with known secrets set."""
    exe = _docker_compose()
    r = _compose("config", env={"REDIS_PASSWORD": "pw-from-env", "FLOWER_BASIC_AUTH": "ops:flowerpw"})
    assert r.returncode == 0, r.stderr
    # docker-compose is a Python program using PyYAML; use its interpreter to read YAML
    # (the project venv does not need PyYAML for anything else).
    shebang = Path(exe).read_text(errors="replace").splitlines()[0]
    interpreter = shebang[2:].strip().split()[0] if shebang.startswith("#!") else "python3"
    conv = subprocess.run([interpreter, "-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
                          input=r.stdout, capture_output=True, text=True, timeout=30)
    if conv.returncode != 0:
        pytest.skip(f"cannot read YAML with docker-compose's interpreter: {conv.stderr.strip()}")
    return json.loads(conv.stdout)


def test_config_validates():
    r = _compose("config", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


def test_services_and_images(config):
    services = config["services"]
    assert set(services) >= {"redis", "worker", "scheduler", "flower"}
    for name in MXQ_SERVICES:
        build = services[name]["build"]
        assert Path(build["context"]).resolve() == ROOT
        assert build["dockerfile"] == "ops/Dockerfile"
        assert "healthcheck" in services[name], name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in services["redis"]


def test_worker_is_scalable(config):
    worker = config["services"]["worker"]
    assert "container_name" not in worker      # --scale needs distinct names
    assert not worker.get("ports")             # and no fixed host port
    assert worker["command"] == ["mxq", "worker"]
    # The healthcheck pings this container's own Celery node.
    test = " ".join(worker["healthcheck"]["test"])
    assert "inspect ping" in test and "celery@$$HOSTNAME" in test


def test_redis_password_and_durability(config):
    redis = config["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--requirepass" in command
    assert redis["environment"]["REDIS_PASSWORD"] == "pw-from-env"
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    for name in MXQ_SERVICES:
        url = config["services"][name]["environment"]["MXQ_REDIS_URL"]
        assert url == "redis://:pw-from-env@redis:6379/0", (name, url)


def test_flower_auth_and_port(config):
    flower = config["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "ops:flowerpw"
    assert any(str(p.get("target")) == "5555" for p in flower["ports"])
    assert flower["command"][:2] == ["mxq", "flower"]
    assert "--port=5555" in flower["command"]


def test_scaling_is_accepted():
    """``--scale`` needs an engine to run, but the file must not pin anything it would clash on."""
    text = COMPOSE.read_text()
    worker_block = text.split("\n  worker:\n", 1)[1].split("\n  scheduler:\n", 1)[0]
    assert "container_name" not in worker_block and "ports:" not in worker_block


@pytest.mark.parametrize("service", MXQ_SERVICES)
def test_service_commands_exist(config, service):
    """Each service's command is an ``mxq`` sub-command that answers ``--help``."""
    command = config["services"][service]["command"]
    assert command[0] == "mxq"
    r = subprocess.run([MXQ, command[1], "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert command[1] in r.stdout


def test_celery_commands_resolve():
    """``celery -A mxq.tasks`` (worker healthcheck, Flower) finds mxq's app, and Flower is importable."""
    r = subprocess.run([sys.executable, "-c", "import flower, celery.bin.celery"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "celery", "-A", "mxq.tasks", "inspect", "--list"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s+ping\b", r.stdout, re.M), r.stdout


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^RUN pip install "\.\[worker\]"', text, re.M)     # dkim, metrics, flower
    assert re.search(r"^USER (?!root)\S+", text, re.M)          # Celery should not run as root
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for src in copied.split():
            assert (ROOT / src).exists(), f"ops/Dockerfile copies {src}, which does not exist"
    # Every package the wheel needs is copied (setuptools finds workers* and tasks*).
    assert "COPY workers" in text and "COPY tasks" in text
    # The scheduler's healthcheck reads the schedule path the image sets.
    assert "MXQ_BEAT_SCHEDULE=" in text
