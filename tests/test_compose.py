"""docker-compose.yml and ops/Dockerfile: what ``docker-compose config`` says about them.

Compose v1 (Debian's ``docker-compose``) validates and normalises the file offline; here with a
project directory of the test's own holding the ``.env`` the file reads (``env_file: .env``, the
same file Compose reads for ``${...}``).  The stack is run for real in tests/test_containers.py.
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

from mxq import settings as registry

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "ops" / "Dockerfile"
MXQ = str(Path(sys.executable).with_name("mxq"))
MXQ_SERVICES = ("worker", "scheduler", "flower")
REQUIRED = {"MXQ_HELO_NAME": "mail.example.test", "FLOWER_BASIC_AUTH": "ops:flowerpw",
            "REDIS_PASSWORD": "pw-from-env"}


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("docker-compose is missing (ops/install-deps installs it)")
        pytest.skip("docker-compose is not installed (ops/install-deps installs it)")
    return exe


def _compose(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MXQ_", "FLOWER_", "REDIS_"))}
    return subprocess.run([_docker_compose(), "--project-directory", str(project), "-f", str(COMPOSE), *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=60)


def _yaml(text: str) -> dict:
    # docker-compose is a Python program using PyYAML; use its interpreter to read YAML
    # (the project venv does not need PyYAML for anything else).
    shebang = Path(_docker_compose()).read_text(errors="replace").splitlines()[0]
    interpreter = shebang[2:].strip().split()[0] if shebang.startswith("#!") else "python3"
    conv = subprocess.run([interpreter, "-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
                          input=text, capture_output=True, text=True, timeout=30)
    if conv.returncode != 0:
        pytest.skip(f"cannot read YAML with docker-compose's interpreter: {conv.stderr.strip()}")
    return json.loads(conv.stdout)


def _every_setting() -> dict[str, str]:
    """A value for every MXQ_* setting of the registry, each one recognisable."""
    values = {}
    for name, s in registry.REGISTRY.items():
        values[name] = s.show(s.default) if s.default is not None else (s.example or "x")
    values.update(MXQ_RELAY="smtp://u:p@relay.example.test:587", MXQ_RELAY_MODE="fallback",
                  MXQ_DKIM="/etc/mxq/dkim/keys.json", MXQ_BATCH_SIZE="37", MXQ_METRICS_PORT="9808",
                  MXQ_RESULT_BACKEND="redis://results.example.test:6379/2")
    return values


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("compose")
    env = dict(_every_setting(), **REQUIRED)
    (d / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return d


@pytest.fixture(scope="module")
def config(project) -> dict:
    r = _compose(project, "config")
    assert r.returncode == 0, r.stderr
    return _yaml(r.stdout)


def test_config_validates(project):
    r = _compose(project, "config", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


def test_every_setting_from_env_reaches_every_mxq_container(config):
    wanted = dict(_every_setting(), MXQ_HELO_NAME=REQUIRED["MXQ_HELO_NAME"])
    for service in MXQ_SERVICES:
        env = config["services"][service]["environment"]
        for name, value in wanted.items():
            if name in ("MXQ_REDIS_URL", "MXQ_BEAT_SCHEDULE") or (service == "flower" and name == "MXQ_METRICS_PORT"):
                continue        # set by the compose file itself (Redis in the stack, the image's paths)
            assert env.get(name) == value, (service, name, env.get(name), value)
        assert env["MXQ_REDIS_URL"] == "redis://:pw-from-env@redis:6379/0"


def test_the_env_example_is_what_compose_reads(tmp_path):
    """``.env.example`` copied to ``.env`` with the three required values filled in is valid."""
    text = (ROOT / ".env.example").read_text()
    for name, value in REQUIRED.items():
        text = re.sub(rf"^{name}=$", f"{name}={value}", text, flags=re.M)
    (tmp_path / ".env").write_text(text)
    r = _compose(tmp_path, "config", "-q")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_refuses_to_start_without_helo_name_flower_password_or_redis_password(tmp_path, missing):
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()) + f"{missing}=\n")
    r = _compose(tmp_path, "config", "-q")
    assert r.returncode != 0 and missing in r.stderr, (missing, r.stderr)


def test_services_images_and_build_argument(config, project):
    services = config["services"]
    assert set(services) >= {"redis", "worker", "scheduler", "flower"}
    for name in MXQ_SERVICES:
        build = services[name]["build"]
        assert Path(build["context"]).resolve() == project.resolve()        # the project directory
        assert build["dockerfile"] == "ops/Dockerfile"
        assert build["args"]["BASE"] == "python:3.11-slim"                  # MXQ_BASE_IMAGE overrides
        assert "healthcheck" in services[name], name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        vols = [v if isinstance(v, str) else f"{v.get('source')}:{v['target']}:{'ro' if v.get('read_only') else 'rw'}"
                for v in services[name]["volumes"]]
        assert any(v.endswith(":/etc/mxq/dkim:ro") for v in vols), (name, vols)      # MXQ_DKIM_KEYS
    assert "healthcheck" in services["redis"]


def test_worker_is_scalable_named_and_exposes_metrics(config):
    worker = config["services"]["worker"]
    assert "container_name" not in worker      # --scale needs distinct names
    assert not worker.get("ports")             # and no fixed host port
    assert worker["command"] == ["mxq", "worker", "--processes", "1", "--hostname", "mxq@%h"]
    test = " ".join(worker["healthcheck"]["test"])
    assert "inspect ping" in test and "mxq@$$HOSTNAME" in test
    assert worker["expose"] == ["9808"] and worker["environment"]["MXQ_METRICS_PORT"] == "9808"
    assert config["services"]["scheduler"]["expose"] == ["9808"]          # the fleet-wide queue depths


def test_redis_password_and_durability(config):
    redis = config["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "--requirepass" in command
    assert redis["environment"]["REDIS_PASSWORD"] == "pw-from-env"
    assert "ping" in " ".join(redis["healthcheck"]["test"])


def test_flower_auth_and_loopback_port(config):
    flower = config["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "ops:flowerpw"
    (port,) = flower["ports"]
    if isinstance(port, str):
        assert port in ("127.0.0.1:5555:5555", "127.0.0.1:5555:5555/tcp"), port
    else:
        assert str(port["target"]) == "5555" and port.get("host_ip") == "127.0.0.1"
    assert flower["command"][:2] == ["mxq", "flower"] and "--port=5555" in flower["command"]


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
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M) and re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert re.search(r'^ARG MXQ_SPEC="/src\[worker\]"$', text, re.M)      # dkim, metrics, flower
    assert re.search(r"^USER (?!root)\S+", text, re.M)          # Celery should not run as root
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for src in copied.split():
            assert (ROOT / src).exists(), f"ops/Dockerfile copies {src}, which does not exist"
    assert "COPY workers" in text and "COPY tasks" in text
    assert "MXQ_BEAT_SCHEDULE=" in text          # the scheduler's heartbeat, read by its healthcheck
