"""The setup's pins agree with each other: mc_setup's TORCH_PIN (what tests/conftest.py checks the CPU build
against), the torch extras and the CPU wheel's path source in pyproject.toml, and uv.lock. Also: uv.lock is
portable (no absolute paths) and locks what pyproject.toml asks for (`uv sync --locked` in mc_setup checks
that fully; this catches the forgotten `uv lock` without uv)."""

import os
import re

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def torch_pin():
    return re.search(r"^TORCH_PIN=(\S+)", read("mc_setup"), re.M).group(1)


def test_torch_pins_agree():
    pin = torch_pin()
    project = tomllib.loads(read("pyproject.toml"))
    extras = project["project"]["optional-dependencies"]
    assert extras["cpu"] == [f"torch=={pin}"] and extras["gpu"] == [f"torch=={pin}"]
    assert not any(d.startswith("torch") for d in project["project"]["dependencies"]), "torch only via cpu/gpu"
    assert [{"extra": "cpu"}, {"extra": "gpu"}] in project["tool"]["uv"]["conflicts"]
    wheel = f"torch-{pin}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    (source,) = project["tool"]["uv"]["sources"]["torch"]
    assert source["path"] == f".wheels/{wheel}" and source["extra"] == "cpu"
    assert re.search(r'^CPU_WHEEL="torch-\$TORCH_PIN\+cpu-cp311-cp311-manylinux_2_28_x86_64\.whl"$', read("mc_setup"), re.M)
    assert read(".python-version").strip() == "3.11"  # the wheel's CPython

    lock = tomllib.loads(read("uv.lock"))
    torches = {p["version"]: p for p in lock["package"] if p["name"] == "torch"}
    assert set(torches) == {pin, f"{pin}+cpu"}, set(torches)
    assert torches[f"{pin}+cpu"]["source"] == {"path": f".wheels/{wheel}"}
    assert torches[pin]["source"] == {"registry": "https://pypi.org/simple"}


def test_lock_is_portable_and_current():
    text = read("uv.lock")
    assert not re.search(r"file://|\"/(work|home|root|tmp|Users)/", text), "an absolute path in uv.lock"
    lock = tomllib.loads(text)
    (me,) = [p for p in lock["package"] if p["source"] == {"editable": "."}]
    project = tomllib.loads(read("pyproject.toml"))["project"]
    assert me["name"] == project["name"]

    def names(reqs):
        return {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower().replace("_", "-") for r in reqs}

    wanted = names(project["dependencies"]) | {n for reqs in project["optional-dependencies"].values()
                                              for n in names(reqs)}
    locked = {r["name"] for r in me["metadata"]["requires-dist"]}
    assert locked == wanted, f"pyproject.toml and uv.lock differ (run `uv lock`): {sorted(locked ^ wanted)}"
