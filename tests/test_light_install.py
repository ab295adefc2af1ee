"""The product install: a fresh venv with only `faceverify[cpu]` (no torch, torchvision or
facenet-pytorch installed) enrolls, verifies and scans real photos, and never imports them.

This builds a real venv with pip (from the package registry or pip's cache), so it takes a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "facenet_pytorch")

# Runs the CLI in-process, then reports the exit code and which heavy modules were imported.
RUN_CLI = textwrap.dedent("""
    import json, sys
    from verify.cli import app
    code = 0
    try:
        app(sys.argv[1:])
    except SystemExit as e:
        code = e.code or 0
    heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'facenet_pytorch'})
    print(json.dumps({'exit': code, 'heavy': heavy}), file=sys.stderr)
""")


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    r = subprocess.run(pip + [f"{REPO}[cpu]"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return venv


def run_light(venv: Path, *args: object, cwd: Path) -> tuple[int, list[str], str]:
    env = {**os.environ, "FACEVERIFY_HOME": str(cwd / "home")}
    r = subprocess.run([str(venv / "bin" / "python"), "-c", RUN_CLI, *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, env=env)
    status = json.loads(r.stderr.strip().splitlines()[-1])
    return status["exit"], status["heavy"], r.stdout + r.stderr


@pytest.mark.slow
def test_product_extra_runs_enroll_verify_scan_without_torch(light_venv, tmp_path, lfw_root):
    py = str(light_venv / "bin" / "python")
    for mod in HEAVY:  # not installed at all: nothing can import them
        assert subprocess.run([py, "-c", f"import {mod}"], capture_output=True).returncode != 0, mod
    lfw = lfw_root / "lfw-deepfunneled"
    me = sorted((lfw / "Jennifer_Lopez").glob("*.jpg"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in me[3:6] + [sorted((lfw / n).glob("*.jpg"))[0] for n in ("Hans_Blix", "Paul_Wolfowitz")]:
        shutil.copy(p, photos / p.name)
    (photos / "broken.jpg").write_bytes(me[0].read_bytes()[:700])

    code, heavy, out = run_light(light_venv, "enroll", "jlo", *me[:3], "--augment", 2, cwd=tmp_path)
    assert code == 0 and heavy == [], out
    assert "3 photos used" in out
    code, heavy, out = run_light(light_venv, "verify", me[3], "--as", "jlo", cwd=tmp_path)
    assert code == 0 and heavy == [] and "MATCH jlo" in out, out
    code, heavy, out = run_light(light_venv, "scan", photos, "--out", tmp_path / "r.csv", "--workers", 2, cwd=tmp_path)
    assert code == 0 and heavy == [], out
    import pandas as pd

    report = pd.read_csv(tmp_path / "r.csv")
    matched = set(report.loc[report["match"] == True, "path"].map(lambda p: Path(p).name))  # noqa: E712
    assert {p.name for p in me[3:6]} <= matched and not any(n.startswith(("Hans", "Paul")) for n in matched)
    assert (report["status"] == "error").sum() == 1  # the broken file, named in the report
    code, heavy, out = run_light(light_venv, "find", "jlo", "--out", tmp_path / "f.csv", cwd=tmp_path)
    assert code == 0 and heavy == [], out
