"""The scan's Ray engine (verify/scan/ray_engine.py) on a real two-node Ray cluster on this machine:
the same index and report as the local engine, work on both nodes, an actor process killed mid-scan
retried by Ray with every file once, and a wrong --address refused before anything is written.
The shipped model on real LFW photos, small folders (the suite stays fast on 2 cores)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray.cluster_utils import Cluster
from typer.testing import CliRunner

from verify.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each: a pool of two one-CPU actors needs both nodes."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "object_store_memory": 150 << 20})
    c.add_node(num_cpus=1, object_store_memory=150 << 20)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, lfw_root) -> Path:
    """24 LFW photos of 22 people (Jennifer Lopez thrice), a broken JPEG and a text file."""
    folder = tmp_path_factory.mktemp("ray") / "photos"
    people = sorted(p for p in (lfw_root / "lfw-deepfunneled").iterdir() if p.is_dir())
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for i, d in enumerate(people[:21]):
        shutil.copy(sorted(d.glob("*.jpg"))[0], folder / ("a" if i % 2 else "b") / f"{d.name}.jpg")
    jlo = sorted((lfw_root / "lfw-deepfunneled" / "Jennifer_Lopez").glob("*.jpg"))
    for p in jlo[1:4]:
        shutil.copy(p, folder / "a" / p.name)
    (folder / "b" / "broken.jpg").write_bytes(jlo[0].read_bytes()[:700])
    (folder / "notes.txt").write_text("not a photo\n")
    return folder


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, lfw_root) -> Path:
    g = tmp_path_factory.mktemp("gallery") / "g"
    jlo = sorted((lfw_root / "lfw-deepfunneled" / "Jennifer_Lopez").glob("*.jpg"))
    r = invoke("enroll", "jlo", jlo[0], "--gallery", g, "--augment", 1, "--runtime", "onnx")
    assert r.exit_code == 0, r.output
    return g


@pytest.fixture(scope="module")
def local_scan(tmp_path_factory, photos, gallery) -> Path:
    """The local engine's index and report of `photos`: the reference."""
    out = tmp_path_factory.mktemp("local")
    r = invoke("scan", photos, "--gallery", gallery, "--index", out / "lib.db", "--out", out / "report.csv",
               "--workers", 2, "--runtime", "onnx")
    assert r.exit_code == 0, r.output
    return out


def index_rows(db: Path) -> pd.DataFrame:
    """Every file and face of an index with its embedding: one row per face (or face-less file)."""
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "SELECT f.path, f.status, f.faces, fa.face, fa.x1, fa.y1, fa.x2, fa.y2, e.vector FROM files f "
            "LEFT JOIN faces fa ON fa.file_id = f.id LEFT JOIN embeddings e ON e.face_id = fa.id "
            "ORDER BY f.path, fa.face").fetchall()
    df = pd.DataFrame(rows, columns=["path", "status", "faces", "face", "x1", "y1", "x2", "y2", "vector"])
    df["vector"] = [None if v is None else np.frombuffer(v, np.float32) for v in df["vector"]]
    return df


def assert_same_index(db: Path, reference: Path) -> None:
    got, want = index_rows(db), index_rows(reference)
    assert not got.duplicated(["path", "face"]).any()  # every file and face once
    pd.testing.assert_frame_equal(got.drop(columns=["vector", "x1", "y1", "x2", "y2"]),
                                  want.drop(columns=["vector", "x1", "y1", "x2", "y2"]))
    boxes = ["x1", "y1", "x2", "y2"]
    np.testing.assert_allclose(got[boxes].fillna(-1).to_numpy(float), want[boxes].fillna(-1).to_numpy(float),
                               atol=1e-3)
    faces = want["vector"].notna()
    assert faces.sum() >= 20
    assert got["vector"].notna().equals(faces)
    np.testing.assert_allclose(np.stack(got["vector"][faces]), np.stack(want["vector"][faces]), atol=1e-5)


def same_matches(report: Path, reference: Path) -> None:
    got, want = pd.read_csv(report), pd.read_csv(reference)
    assert len(got) == len(want) and want["match"].fillna(False).astype(bool).sum() >= 2  # Jennifer Lopez in 2 of her 3 other photos
    assert got["path"].tolist() == want["path"].tolist()
    assert got["match"].tolist() == want["match"].tolist()
    assert got["status"].tolist() == want["status"].tolist()


def test_two_nodes_same_as_local_engine(tmp_path, cluster, photos, gallery, local_scan):
    db, report = tmp_path / "lib.db", tmp_path / "report.csv"
    r = invoke("scan", photos, "--gallery", gallery, "--index", db, "--out", report, "--runtime", "onnx",
               "--engine", "ray", "--address", cluster.address, "--workers", 2, "--stats")
    assert r.exit_code == 0, r.output
    assert "ray: 2 nodes, 2 actor processes" in r.output
    assert "26 files walked, 26 analysed" in r.output
    assert_same_index(db, local_scan / "lib.db")
    same_matches(report, local_scan / "report.csv")

    again = invoke("scan", photos, "--gallery", gallery, "--index", db, "--out", tmp_path / "r2.csv",
                   "--runtime", "onnx", "--engine", "ray", "--address", cluster.address)
    assert again.exit_code == 0, again.output
    assert "0 analysed, 26 unchanged" in again.output  # the index is shared by both engines' rules


def test_actor_killed_mid_scan_is_retried(tmp_path, cluster, photos, gallery, local_scan):
    from index.library import Library
    from verify.identity.galleries import open_gallery
    from verify.faces import DetectorConfig
    from verify.model.runtimes import load_embedder
    from verify.identity.galleries import build_matcher
    from verify.scan.indexed import run_indexed_scan
    from verify.scan.ray_engine import RayEngine, RayOptions

    trace = tmp_path / "trace"
    trace.mkdir()
    killed: list[int] = []

    def kill_one_actor() -> None:
        """Once four tasks have started, SIGKILL the process that started the latest one."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            lines = [(f.stat().st_mtime_ns, f) for f in trace.glob("*.trace")]
            started = sum(len(f.read_text().splitlines()) for _, f in lines)
            if started >= 4:
                pid = int(max(lines)[1].stem)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    embedder = load_embedder(None, "cpu", "onnx")
    config = DetectorConfig(device="cpu", runtime="onnx")
    watcher = threading.Thread(target=kill_one_actor, daemon=True)
    with RayEngine(RayOptions(address=cluster.address, workers=2, files_per_task=1, trace_dir=str(trace))) as engine, \
            Library.open(tmp_path / "lib.db") as lib:
        watcher.start()
        summary = run_indexed_scan([photos], library=lib, embedder=embedder,
                                   matcher=build_matcher(open_gallery(gallery, embedder, create=False), embedder),
                                   out=tmp_path / "report.csv", detector_config=config, progress=False,
                                   engine=engine)
    watcher.join()
    assert killed, "no actor was killed: the scan ended before four tasks started"
    pids = {int(f.stem) for f in trace.glob("*.trace")}
    assert len(pids) >= 3, f"the killed actor was not replaced: actor processes {pids}"  # 2 + the restart
    assert summary.index["analysed"] == 26 and summary.processed == 26
    assert_same_index(tmp_path / "lib.db", local_scan / "lib.db")  # every file once, nothing lost
    same_matches(tmp_path / "report.csv", local_scan / "report.csv")


@pytest.mark.parametrize("address, problem", [("127.0.0.1:1", "no Ray cluster answers there"),
                                               ("nohost", "expected auto, HOST:PORT or ray://HOST:PORT")])
def test_wrong_address_is_one_line_and_writes_nothing(tmp_path, photos, gallery, address, problem):
    db, report = tmp_path / "lib.db", tmp_path / "report.csv"
    t0 = time.monotonic()
    r = runner.invoke(app, ["scan", str(photos), "--gallery", str(gallery), "--index", str(db), "--out", str(report),
                            "--engine", "ray", "--address", address])
    assert r.exit_code == 2
    assert time.monotonic() - t0 < 30
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--address {address}: {problem}" in errors[0]
    assert not db.exists() and not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_local_instance_by_default(tmp_path, photos, gallery, local_scan):
    """Without --address the command starts (and stops) its own Ray instance; a fresh process, as a user runs it."""
    db, report = tmp_path / "lib.db", tmp_path / "report.csv"
    r = subprocess.run([sys.executable, "-m", "verify", "scan", str(photos), "--gallery", str(gallery), "--index",
                        str(db), "--out", str(report), "--runtime", "onnx", "--engine", "ray", "--workers", "2"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ray: 1 nodes, 2 actor processes" in r.stdout
    assert_same_index(db, local_scan / "lib.db")
    same_matches(report, local_scan / "report.csv")


def test_driver_killed_mid_scan_resumes(tmp_path, cluster, photos, gallery, local_scan):
    """kill -9 of the scan process itself: the batches it wrote stay, the next scan analyses the rest."""
    db, report = tmp_path / "lib.db", tmp_path / "report.csv"
    cmd = [sys.executable, "-m", "verify", "scan", str(photos), "--gallery", str(gallery), "--index", str(db),
           "--out", str(report), "--runtime", "onnx", "--engine", "ray", "--address", cluster.address,
           "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    stored = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                    stored = c.execute("SELECT count(*) FROM files WHERE status != 'skipped'").fetchone()[0]
            except sqlite3.OperationalError:  # the schema is being created
                stored = 0
            if stored >= 6:
                proc.kill()
                break
        time.sleep(0.05)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the scan ended before it could be killed"
    assert 6 <= stored < 25 and not report.exists()

    r = invoke("scan", photos, "--gallery", gallery, "--index", db, "--out", report, "--runtime", "onnx",
               "--engine", "ray", "--address", cluster.address)
    assert r.exit_code == 0, r.output
    walked, analysed, unchanged = map(int, re.search(r"(\d+) files walked, (\d+) analysed, (\d+) unchanged",
                                                      r.output).groups())
    assert walked == 26 and analysed + unchanged == 26 and unchanged >= 6
    assert_same_index(db, local_scan / "lib.db")
    same_matches(report, local_scan / "report.csv")
