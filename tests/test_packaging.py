"""mxq installs one top-level package, ``mxq``: nothing named ``tasks`` or ``workers``."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.fixtures_infra import build_wheel


def test_wheel_has_one_top_level_package(tmp_path):
    # --no-build-isolation: the test session has no network (private namespace);
    # the test extra installs setuptools and wheel into the venv.
    r = build_wheel(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    wheels = list(tmp_path.glob("mxq-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"mxq", wheels[0].name.split("-py")[0] + ".dist-info"}, tops
    folders = {n.rsplit("/", 1)[0] for n in names if n.endswith(".py")}
    assert {"mxq", "mxq/workers", "mxq/tasks", "mxq/contrib", "mxq/sandbox"} <= folders
    assert "mxq/tasks/contrib/__init__.py" not in names         # contrib is mxq.contrib only
    assert "mxq/contrib/django/__init__.py" in names and "mxq/contrib/django/urls.py" in names
    assert "mxq/tasks/graph.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names


def test_only_mxq_is_importable_outside_the_checkout(tmp_path):
    code = ("import importlib.util as u, mxq.tasks, mxq.workers.session, mxq.contrib.django;"
            "print(u.find_spec('tasks'), u.find_spec('workers'), mxq.contrib.django.EmailBackend.__module__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "None", "mxq.contrib.django"]
