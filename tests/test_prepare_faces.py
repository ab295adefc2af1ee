"""scripts/prepare_faces.py on a few real CelebA images: alignment, exact duplicates, failures, resume."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CELEBA = ROOT.parent / "shared" / "data" / "celeba" / "img_align_celeba"

pytestmark = pytest.mark.skipif(not CELEBA.is_dir(), reason=f"real CelebA images absent: {CELEBA}")


def _module():
    spec = importlib.util.spec_from_file_location("prepare_faces", ROOT / "scripts" / "prepare_faces.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _source(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    names = sorted(p.name for p in CELEBA.iterdir())[:4]
    for n in names:
        shutil.copy(CELEBA / n, src / n)
    shutil.copy(CELEBA / names[0], src / f"{4242}_{names[1][:-4]}x.jpg")  # exact copy, other name (hash-named)
    shutil.copy(CELEBA / names[2], src / "sub_77_copy.jpg")
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    return src


def test_prepare_aligns_dedups_counts_failures_and_resumes(tmp_path: Path) -> None:
    pf = _module()
    src = _source(tmp_path)
    out = tmp_path / "out"
    first = pf.prepare(src, out, limit=3)  # an "interrupted" run: only the first 3 files
    assert first["in"] == 3
    counts = pf.prepare(src, out)
    assert counts == {"in": 7, "ok": 4, "exact_dup": 2, "failed": 1}
    lines = (out / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == 7  # the resumed run redid nothing
    made = sorted(p.name for p in (out / "img_align_celeba").iterdir())
    assert made == sorted(p.name for p in src.iterdir() if pf._CELEBA_NAME.match(p.name) and "_" not in p.name)
    assert "broken.jpg" in (out / "failed.txt").read_text()
    img = Image.open(out / "img_align_celeba" / made[0])
    assert img.size == (178, 218)
    # A CelebA image re-aligned onto the CelebA frame stays close to itself (centre region).
    a = np.asarray(img, float)[60:180, 40:140]
    b = np.asarray(Image.open(CELEBA / made[0]).convert("RGB"), float)[60:180, 40:140]
    assert np.abs(a - b).mean() < 40
    assert json.loads((out / "counts.json").read_text()) == counts


def test_out_name_keeps_celeba_names() -> None:
    pf = _module()
    assert pf.out_name("celeba_identity_samples/10000_028381.jpg") == "028381.jpg"
    assert pf.out_name("000001.jpg") == "000001.jpg"
    assert len(pf.out_name("UTKFace/1_0_0_2016.jpg")) == 20
