"""The settings registry (``mxq.settings``): one definition per ``MXQ_*`` setting, read everywhere.

Pure logic is tested in process; ``mxq config`` and the exit statuses run the real ``mxq``
command; the framework precedence runs a real Django project in a subprocess against a real
``redis-server`` (the web process: DKIM at intake, webhook events, ``mxq.tasks.status``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mxq import settings as registry
from mxq.settings import REGISTRY, ConfigError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = [ROOT / "workers", ROOT / "tasks", ROOT / "mxq"]
#: MXQ_* names in the package that are not settings: prefixes and the ops scripts' own variables.
NOT_SETTINGS = {"MXQ_BENCH_", "MXQ_DEMO_", "MXQ_WEBHOOK_", "MXQ_PYTHON", "MXQ_SKIP_APT", "MXQ_NEW", "MXQ_X",
                "MXQ_DKIM_KEYS", "MXQ_BASE_IMAGE", "MXQ_IMAGE", "MXQ_REDIS_IMAGE"}   # docker-compose.yml only


def package_sources():
    for d in PACKAGE_DIRS:
        for p in d.rglob("*.py"):
            yield p, p.read_text(encoding="utf-8")


# ---------------------------------------------------------------- one registry, used everywhere
def test_every_mxq_name_in_the_package_is_a_registered_setting():
    unknown = {}
    for path, text in package_sources():
        for name in set(re.findall(r"\bMXQ_[A-Z][A-Z0-9_]*", text)):
            if name not in REGISTRY and name not in NOT_SETTINGS:
                unknown.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not unknown, f"MXQ_* names without a registry entry (add one in mxq/settings.py): {unknown}"


def test_no_module_reads_mxq_variables_from_the_environment_itself():
    reads = re.compile(r"""(environ\.get\(|environ\[|getenv\(|env\.get\(|env\[)\s*["']MXQ_""")
    offenders = []
    for path, text in package_sources():
        if path == ROOT / "mxq" / "settings.py":
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if reads.search(line) and not re.search(r"\]\s*=[^=]", line):     # writing for a child is fine
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "read MXQ_* through mxq.settings instead:\n" + "\n".join(offenders)


def test_every_setting_has_a_doc_a_kind_and_a_parseable_default():
    assert len(REGISTRY) >= 40
    for s in REGISTRY.values():
        assert s.doc and s.kind.label and s.group in registry.GROUP_TITLES, s.name
        if s.default is not None:       # the default, spelled as text, parses back to itself
            assert s.parse(s.show(s.default)) == s.default, s.name
        else:
            assert s.default_text, f"{s.name}: an unset default needs default_text for the docs"


def test_the_readme_table_and_env_example_are_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert registry.readme_with_table(readme) == readme, "README table stale: python -m mxq.settings --write"
    assert (ROOT / ".env.example").read_text() == registry.env_example(), \
        ".env.example stale: python -m mxq.settings --write"
    for name in REGISTRY:
        assert f"`{name}`" in readme and f"#{name}=" in registry.env_example() + "#MXQ_HELO_NAME=", name


# ---------------------------------------------------------------- values, errors, origins
@pytest.mark.parametrize("name,bad", [
    ("MXQ_DNS_SERVERS", "foo:bar"), ("MXQ_DNS_SERVERS", "[::1"), ("MXQ_SMTP_PORT", "70000"),
    ("MXQ_TLS", "maybe"), ("MXQ_RELAY", "http://relay.example"), ("MXQ_RELAY_MODE", "sometimes"),
    ("MXQ_CONNECT_TIMEOUT", "-1"), ("MXQ_COMMAND_TIMEOUT", "nan"), ("MXQ_MAX_MESSAGE_SIZE", "big"),
    ("MXQ_REDIS_URL", "http://localhost"), ("MXQ_RETRY_SCHEDULE", "soon"), ("MXQ_RETRY_SCHEDULE", "0"),
    ("MXQ_BATCH_SIZE", "0"), ("MXQ_SUBMIT_TIMEOUT", "1e9"), ("MXQ_WEBHOOK_URL", "ftp://x.example"),
    ("MXQ_WEBHOOK_TIMEOUT", "120"), ("MXQ_ON_COMMIT", "perhaps"), ("MXQ_SUPPRESS_TTL", "-5"),
    ("MXQ_RESULT_BACKEND", "cassandra://x"),
])
def test_a_bad_value_names_its_variable(name, bad):
    with pytest.raises(ConfigError, match=f"^{name} ") as e:
        registry.load({name: bad})[name]
    assert e.value.name == name and isinstance(e.value, ValueError)


@pytest.mark.parametrize("env,name", [
    ({"MXQ_DNS_SERVERS": "foo:bar"}, "MXQ_DNS_SERVERS"),
    ({"MXQ_RELAY_MODE": "always"}, "MXQ_RELAY_MODE"),
    ({"MXQ_RELAY": "smtp://u:p@relay.example:99999"}, "MXQ_RELAY"),
    ({"MXQ_COMMAND_TIMEOUT": "0"}, "MXQ_COMMAND_TIMEOUT"),
])
def test_the_engine_facade_names_the_variable(env, name):
    from mxq.workers.config import Settings
    with pytest.raises(ValueError, match=name):
        Settings.from_env(env)


def test_the_pipeline_facades_read_the_registry():
    from mxq.tasks.settings import PipelineSettings
    from mxq.tasks.webhooks import WebhookConfig

    s = PipelineSettings.from_env({"MXQ_BATCH_SIZE": "7", "MXQ_RETRY_SCHEDULE": "1, 5,30",
                                   "MXQ_SUBMIT_TIMEOUT": "0.5", "MXQ_RESULT_BACKEND": "redis://127.0.0.1:1/3"})
    assert (s.batch_size, s.retry_schedule, s.submit_timeout, s.result_backend) == (
        7, (1.0, 5.0, 30.0), 0.5, "redis://127.0.0.1:1/3")
    assert PipelineSettings.from_env({}) == PipelineSettings()
    with pytest.raises(ConfigError, match="^MXQ_TASK_HARD_LIMIT"):
        PipelineSettings.from_env({"MXQ_TASK_SOFT_LIMIT": "100", "MXQ_TASK_HARD_LIMIT": "50"})
    w = WebhookConfig.from_env({"MXQ_WEBHOOK_URL": "https://h.example/x", "MXQ_WEBHOOK_CONCURRENCY": "3"})
    assert (w.url, w.concurrency, w.timeout) == ("https://h.example/x", 3, 5.0)


def test_empty_is_unset_and_layers_override_in_order():
    c = registry.Config([("environment", {"MXQ_BATCH_SIZE": "7", "MXQ_TLS": "required", "MXQ_FOO": "1"}),
                         ("Django settings", {"MXQ_BATCH_SIZE": 9, "MXQ_TLS": "", "MXQ_RETRY_SCHEDULE": [1, 2],
                                              "MXQ_ON_COMMIT": True, "MXQ_DOMAIN_CONCURRENCY": None})])
    assert c["MXQ_BATCH_SIZE"] == 9 and c.origin("MXQ_BATCH_SIZE") == "Django settings"
    assert c["MXQ_TLS"] == "opportunistic" and c.origin("MXQ_TLS") == "default"      # "" clears it
    assert c["MXQ_RETRY_SCHEDULE"] == (1.0, 2.0) and c["MXQ_ON_COMMIT"] is True
    assert c["MXQ_DOMAIN_CONCURRENCY"] == 4 and not c.is_set("MXQ_DOMAIN_CONCURRENCY")
    assert c.unknown == {"MXQ_FOO": "environment"}
    assert c.env() == {"MXQ_BATCH_SIZE": "9", "MXQ_RETRY_SCHEDULE": "1,2", "MXQ_ON_COMMIT": "1"}
    with pytest.raises(ConfigError, match=r"^MXQ_BATCH_SIZE \(from Django settings\) must be"):
        registry.Config([("Django settings", {"MXQ_BATCH_SIZE": "many"})])["MXQ_BATCH_SIZE"]


def test_current_follows_the_environment_and_configure(monkeypatch):
    monkeypatch.setenv("MXQ_BATCH_SIZE", "11")
    assert registry.value("MXQ_BATCH_SIZE") == 11
    monkeypatch.setenv("MXQ_BATCH_SIZE", "12")
    assert registry.current()["MXQ_BATCH_SIZE"] == 12
    try:
        registry.configure(MXQ_BATCH_SIZE=13)
        assert registry.current()["MXQ_BATCH_SIZE"] == 13
        assert registry.current().origin("MXQ_BATCH_SIZE") == "configure()"
        with pytest.raises(ConfigError, match="^MXQ_BATCH_SIZE"):
            registry.configure(MXQ_BATCH_SIZE="x")
        with pytest.raises(KeyError):
            registry.configure(MXQ_NOT_A_SETTING=1)
    finally:
        registry.configure(MXQ_BATCH_SIZE=None)
    assert registry.current()["MXQ_BATCH_SIZE"] == 12


def test_secrets_are_masked():
    c = registry.Config([("environment", {"MXQ_REDIS_URL": "redis://:s3cret@redis:6379/0",
                                          "MXQ_RELAY": "smtp://user:pa%40ss@relay.example:587",
                                          "MXQ_WEBHOOK_SECRET": "hmac-key",
                                          "MXQ_WEBHOOK_URL": "https://h.example/hook?token=abc"})])
    assert c.shown("MXQ_REDIS_URL") == "redis://:***@redis:6379/0"
    assert c.shown("MXQ_RELAY") == "smtp://user:***@relay.example:587"
    assert c.shown("MXQ_WEBHOOK_SECRET") == "***"
    assert c.shown("MXQ_WEBHOOK_URL") == "https://h.example/hook?***"
    with pytest.raises(ConfigError) as e:
        registry.load({"MXQ_RELAY": "ftp://u:hunter2@x"})["MXQ_RELAY"]
    assert "hunter2" not in str(e.value)


# ---------------------------------------------------------------- the mxq command
def mxq(*args, env: dict | None = None, input: bytes | None = None, timeout: float = 60):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MXQ_") and k != "DJANGO_SETTINGS_MODULE"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "mxq.tasks.cli", *args], capture_output=True, text=True,
                          env=e, cwd=ROOT, timeout=timeout, input=input)


def test_mxq_config_shows_what_is_set_with_origin_and_masks_secrets():
    p = mxq("config", env={"MXQ_REDIS_URL": "redis://:s3cret@127.0.0.1:6390/2", "MXQ_BATCH_SIZE": "7",
                           "MXQ_WEBHOOK_SECRET": "hmac-key", "MXQ_TYPO": "1"})
    assert p.returncode == 0, p.stderr
    lines = {ln.split()[0]: ln for ln in p.stdout.splitlines()}
    assert set(lines) == {"MXQ_REDIS_URL", "MXQ_BATCH_SIZE", "MXQ_WEBHOOK_SECRET"}      # like postconf -n
    assert re.fullmatch(r"MXQ_BATCH_SIZE\s+= 7\s+\(environment\)", lines["MXQ_BATCH_SIZE"])
    assert "redis://:***@127.0.0.1:6390/2" in lines["MXQ_REDIS_URL"]
    assert "s3cret" not in p.stdout + p.stderr and "hmac-key" not in p.stdout + p.stderr
    assert "MXQ_TYPO (environment) is not an mxq setting" in p.stderr

    p = mxq("config", "--json", "--all")
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert set(rows) == set(REGISTRY) and rows["MXQ_BATCH_SIZE"]["origin"] == "default"
    assert rows["MXQ_BATCH_SIZE"]["value"] == "64" and rows["MXQ_REDIS_URL"]["secret"] is True
    p = mxq("config", "batch_size", "-d", env={"MXQ_BATCH_SIZE": "7"})
    assert re.fullmatch(r"MXQ_BATCH_SIZE = 64\s+\(default\)\n", p.stdout), p.stdout
    assert mxq("config", "nope").returncode == 64
    p = mxq("config", "--env-example")
    assert p.returncode == 0 and p.stdout == (ROOT / ".env.example").read_text()


def test_mxq_config_exits_78_naming_every_bad_value():
    p = mxq("config", env={"MXQ_DNS_SERVERS": "foo:bar", "MXQ_BATCH_SIZE": "x", "MXQ_SHAPING": "gmail.com=5q",
                           "MXQ_WEBHOOK_EVENTS": "sometimes"})
    assert p.returncode == 78
    for name in ("MXQ_DNS_SERVERS", "MXQ_BATCH_SIZE", "MXQ_SHAPING", "MXQ_WEBHOOK_EVENTS"):
        assert re.search(rf"^mxq config: error: {name}\b", p.stderr, re.M), (name, p.stderr)
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("command", [["status", "0" * 32], ["queue"], ["send", "-"], ["worker"]])
def test_every_command_exits_78_naming_the_variable(command):
    p = mxq(*command, env={"MXQ_DNS_SERVERS": "foo:bar"}, input="From: a@b.test\nTo: c@d.test\n\nx\n")
    assert p.returncode == 78, (p.returncode, p.stderr)
    assert "MXQ_DNS_SERVERS must be host[:port]" in p.stderr and "Traceback" not in p.stderr


def test_mxq_send_with_a_bad_dkim_key_map_exits_78_not_a_traceback(tmp_path, redis_server):
    srv = redis_server()
    (tmp_path / "keys.json").write_text("{not json")
    msg = "From: a@b.test\nTo: c@d.test\nSubject: x\n\nbody\n"
    for dkim in (str(tmp_path / "keys.json"), str(tmp_path / "missing.json")):
        p = mxq("send", "-", env={"MXQ_REDIS_URL": srv.url, "MXQ_DKIM": dkim}, input=msg)
        assert p.returncode == 78, (p.returncode, p.stderr)
        assert "MXQ_DKIM" in p.stderr and "Traceback" not in p.stderr
    client = srv.client()
    assert client.keys("mxq:job:*") == []       # nothing was submitted
    client.close()


# ---------------------------------------------------------------- Django settings win, in a real project
DJANGO_SCRIPT = r'''
import json, os, sys
import django
django.setup()
from django.conf import settings
from django.core import mail
import mxq.tasks
from mxq import settings as registry
from mxq.tasks.suppress import Suppressions
from mxq.tasks.store import get_store

cfg = registry.current()
out = {"origin": {n: cfg.origin(n) for n in ("MXQ_REDIS_URL", "MXQ_DKIM", "MXQ_WEBHOOK_URL", "MXQ_BATCH_SIZE")}}
Suppressions(get_store().r).add("gone@to.settings.test", text="no such user")
n = mail.send_mail("Signed", "Body.", "app@signed.settings.test", ["ann@to.settings.test", "gone@to.settings.test"])
out["sent"] = n
job = get_store().r.keys("mxq:job:*")[0].decode().split(":")[-1]
st = mxq.tasks.status(job)
out["states"] = sorted(r["state"] for r in st["recipients"])
out["signed"] = b"DKIM-Signature:" in get_store().r.hget("mxq:job:" + job, "c")
out["hooks"] = [json.loads(get_store().r.hget(k, "b"))["state"] for k in get_store().r.keys("mxq:hook:*")]
print(json.dumps(out))
'''


def test_django_settings_win_in_the_web_process_and_in_status(tmp_path, redis_server):
    """MXQ_REDIS_URL, MXQ_DKIM and MXQ_WEBHOOK_URL only in settings.py (the environment points
    elsewhere): the send signs with the key map, the suppressed recipient's webhook event is
    stored, and mxq.tasks.status() reads the settings' Redis."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    srv = redis_server()
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                                       serialization.NoEncryption()))
    (tmp_path / "keys.json").write_text(json.dumps({"signed.settings.test": {"selector": "s1", "key": "k.pem"}}))
    (tmp_path / "proj_settings.py").write_text(textwrap.dedent(f'''
        SECRET_KEY = "x"
        INSTALLED_APPS = []
        EMAIL_BACKEND = "mxq.contrib.django.EmailBackend"
        MXQ_REDIS_URL = {srv.url!r}
        MXQ_DKIM = {str(tmp_path / "keys.json")!r}
        MXQ_WEBHOOK_URL = "http://127.0.0.1:9/hook"
        MXQ_BATCH_SIZE = 7
    '''))
    (tmp_path / "run.py").write_text(DJANGO_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXQ_")}
    env.update(DJANGO_SETTINGS_MODULE="proj_settings", PYTHONPATH=str(tmp_path),
               MXQ_REDIS_URL="redis://127.0.0.1:1/0")        # nothing listens there
    p = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["origin"] == {"MXQ_REDIS_URL": "Django settings", "MXQ_DKIM": "Django settings",
                             "MXQ_WEBHOOK_URL": "Django settings", "MXQ_BATCH_SIZE": "Django settings"}
    assert out["sent"] == 1 and out["states"] == ["queued", "suppressed"]
    assert out["signed"] is True and out["hooks"] == ["suppressed"]

    # mxq config reads the same settings with DJANGO_SETTINGS_MODULE set
    c = subprocess.run([sys.executable, "-m", "mxq.tasks.cli", "config"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=60)
    assert c.returncode == 0, c.stderr
    assert re.search(r"^MXQ_BATCH_SIZE\s+= 7\s+\(Django settings\)$", c.stdout, re.M), c.stdout
