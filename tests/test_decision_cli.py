"""One decision everywhere (issue 28): `verify --json`, `scan` and `find` give the same decision, distance,
threshold and threshold source for the same face, with a per-source calibrated threshold. A tiny random
model whose cohort is its own embeddings of LFW strangers (two labelled sources); real LFW photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from conftest import make_tiny_model
from verify.cli import app
from verify.evaluation.evaluate import build_cohort
from verify.model.cohort import CohortSources, write_cohort_sources
from verify.model.file import Embedder
from verify.model.write import attach_cohort

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_verify_scan_and_find_give_the_same_decision(tmp_path, lfw_root):
    model = make_tiny_model(tmp_path / "tiny.pt", seed=3)
    people = sorted(d for d in (lfw_root / "lfw-deepfunneled").iterdir() if d.name != "Jennifer_Lopez")
    strangers = [sorted(d.glob("*.jpg"))[0] for d in people[:24]]
    faces = build_cohort(strangers, Embedder.load(model), progress=False)  # (C0, D) real faces of this model
    rng = np.random.default_rng(0)
    # two sources of 400 faces each: the strangers' faces and small perturbations of them
    rows = np.concatenate([faces[rng.integers(0, len(faces), 800)] + 0.05 * rng.standard_normal((800, faces.shape[1]))])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    attach_cohort(model, rows, "test strangers")
    cohort = Embedder.load(model).cohort
    write_cohort_sources(model, cohort, CohortSources(np.repeat([0, 1], 400).astype(np.uint8), ("one", "two"),
                                                      np.full(800, -1, dtype=np.int32)))

    g, db = tmp_path / "gallery", tmp_path / "lib.db"
    jlo = sorted((lfw_root / "lfw-deepfunneled" / "Jennifer_Lopez").glob("*.jpg"))
    common = ("--gallery", g, "--model", model, "--device", "cpu")
    r = invoke("enroll", "jlo", *jlo[:3], *common, "--augment", 1, "--target-far", 0.02)
    assert r.exit_code == 0 and "threshold set by cohort:" in r.output, r.output
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in jlo[3:7] + [sorted(d.glob("*.jpg"))[0] for d in people[30:36]]:
        shutil.copy(p, photos / p.name)

    r = invoke("verify", *sorted(photos.iterdir()), *common, "--json")
    verdicts = {}
    for line in r.output.strip().splitlines():
        v = json.loads(line)
        for i, f in enumerate(v["faces"]):
            verdicts[(Path(v["image"]).name, i)] = (f["match"], round(f["distance"], 5), round(f["threshold"], 5),
                                                    f["threshold_source"])
    assert verdicts and {v[3] for v in verdicts.values()} <= {"cohort:one", "cohort:two"}
    assert {v[0] for v in verdicts.values()} == {True, False}, verdicts  # both decisions are compared
    assert invoke("scan", photos, *common, "--workers", 0, "--index", db, "--out", tmp_path / "s.csv").exit_code in (0, 1)
    assert invoke("find", "--gallery", g, "--index", db, "--out", tmp_path / "f.csv").exit_code in (0, 1)
    for report in ("s.csv", "f.csv"):
        df = pd.read_csv(tmp_path / report)
        df = df[df["status"] == "face"]
        got = {(Path(p).name, int(k)): (bool(m), round(d, 5), round(t, 5), s)
               for p, k, m, d, t, s in zip(df["path"], df["face"], df["match"], df["distance"], df["threshold"],
                                           df["threshold_source"])}
        assert got == verdicts, report
