"""The scan's HTML page (`scan --html`, `faceverify report`), checked in a real headless Chromium.

The browser test renders the page of a real scan (LFW and CelebA faces, a truncated JPEG, a text file
and a photo whose name holds quotes, <, &, a newline and non-ASCII), takes a screenshot, and reads
the DOM: every matched face's thumbnail decoded (naturalWidth > 0), the counts equal the CSV's, the
hostile name is text. The page has no script of its own: a harness page frames it and reads it
(same-origin for file:// pages with --allow-file-access-from-files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from verify.scan import journal_path, run_scan
from verify.scan.html import PageOptions, files_dir, render_page, thumbnail_name
from verify.scan.report import ScanSummary

PERSON = "Jennifer_Lopez"
HOSTILE = 'a "quoted" <b>bold & name\nnewline é.jpg'

HARNESS = """<!DOCTYPE html><html><body><pre id="out">pending</pre>
<iframe id="f" src="PAGE" style="width:1200px;height:20000px"></iframe>
<script>
document.getElementById('f').addEventListener('load', () => {
  const d = document.getElementById('f').contentDocument;
  const figures = [...d.querySelectorAll('figure')].map(f => {
    const img = f.querySelector('img');
    return {band: f.dataset.band, src: img.getAttribute('src'), width: img.naturalWidth,
            name: f.querySelector('figcaption a').textContent};
  });
  const counts = Object.fromEntries([...d.querySelectorAll('[data-count]')].map(e => [e.dataset.count, +e.textContent]));
  const problems = [...d.querySelectorAll('tr[data-status]')].map(t => t.dataset.status);
  document.getElementById('out').textContent = JSON.stringify(
    {figures, counts, problems, bold: d.querySelectorAll('b').length, scripts: d.querySelectorAll('script').length});
});
</script></body></html>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/ensure_chromium.sh installs Debian's package)")
        pytest.skip("chromium is not installed (bash scripts/ensure_chromium.sh)")
    return exe


def browser_dom(page: Path, tmp_path: Path) -> dict:
    """What the browser sees in `page`, read from its DOM after everything loaded."""
    harness = page.parent / "harness.html"
    harness.write_text(HARNESS.replace("PAGE", page.name))
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          f"--user-data-dir={tmp_path / 'chrome-profile'}", "--virtual-time-budget=10000",
                          "--dump-dom", harness.as_uri()], capture_output=True, text=True, timeout=120)
    harness.unlink()
    m = re.search(r'<pre id="out">(.*?)</pre>', out.stdout, re.S)
    assert m and m.group(1) != "pending", out.stdout[-2000:] + out.stderr[-2000:]
    import html

    return json.loads(html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def embedder():
    from verify.model.file import Embedder

    return Embedder.load()  # the shipped model: real matches and near-misses


@pytest.fixture(scope="module")
def matcher(lfw_root, embedder):
    from verify.faces import DetectorConfig, FaceDetector, FacePipeline
    from verify.identity.scoring import IdentityMatcher, calibrate_identity, pool_photos

    photos = sorted((lfw_root / "lfw-deepfunneled" / PERSON).glob("*.jpg"))[:3]
    pipeline = FacePipeline(FaceDetector(DetectorConfig(device="cpu", min_face_size=40)), embedder=embedder)
    vecs = np.stack([r.embeddings[0] for r in pipeline.process(photos)])  # (3, D)
    _, pooled = pool_photos(vecs, np.arange(len(vecs)))
    calibration = calibrate_identity(pooled, embedder.cohort, target_far=1e-3)  # as enrollment does
    return IdentityMatcher({PERSON: pooled}, {PERSON: calibration},
                           default_similarity_threshold=embedder.similarity_threshold)


@pytest.fixture(scope="module")
def scan_folder(lfw_root, celeba_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    people = lfw_root / "lfw-deepfunneled"
    mine = sorted((people / PERSON).glob("*.jpg"))
    (root / "me").mkdir()
    for p in mine[3:]:
        shutil.copy(p, root / "me" / p.name)
    shutil.copy(mine[4], root / HOSTILE)
    for d in sorted(people.iterdir())[300:308]:
        shutil.copy(sorted(d.glob("*.jpg"))[0], root / d.name)
    for p in sorted((celeba_root / "img_align_celeba").glob("*.jpg"))[:4]:
        shutil.copy(p, root / f"celeba_{p.name}")
    (root / "broken.jpg").write_bytes(mine[0].read_bytes()[:2500])
    (root / "notes.txt").write_text("not a photo\n")
    return root


@pytest.fixture(scope="module")
def scanned(scan_folder, embedder, matcher, tmp_path_factory):
    from verify.faces import DetectorConfig

    out = tmp_path_factory.mktemp("report")
    page = out / "page" / "report.html"
    summary = run_scan([scan_folder], embedder=embedder, matcher=matcher, out=out / "report.csv", workers=2,
                       detector_config=DetectorConfig(device="cpu", min_face_size=40), html=page, progress=False)
    assert summary.face_workers == 2  # thumbnails were cut in the workers, while they had the pixels
    return out / "report.csv", page, summary


def csv_counts(report: Path) -> dict:
    import pandas as pd

    df = pd.read_csv(report)
    per_file = df.groupby("path", sort=False)["status"].first()
    return {"files": len(per_file), "images": int(per_file.isin(["face", "no-face"]).sum()),
            "faces": int((df["status"] == "face").sum()), "matches": int((df["match"] == True).sum()),  # noqa: E712
            "no_face": int((per_file == "no-face").sum()), "errors": int((per_file == "error").sum()),
            "skipped": int((per_file == "skipped").sum())}


def test_page_of_a_real_scan_in_chromium(scanned, tmp_path):
    import pandas as pd

    report, page, summary = scanned
    df = pd.read_csv(report)
    matched = df[df["match"] == True]  # noqa: E712
    assert len(matched) >= 4 and matched["path"].str.endswith(HOSTILE).any()

    dom = browser_dom(page, tmp_path)
    assert dom["counts"] == csv_counts(report)
    assert dom["counts"]["errors"] == 1 and dom["counts"]["skipped"] == 1
    assert sorted(dom["problems"]) == ["error", "skipped"]
    shown = [f for f in dom["figures"] if f["band"] == "match"]
    want = {f"report_files/{thumbnail_name(r.path, int(r.face))}" for r in matched.itertuples()}
    assert {f["src"] for f in shown} == want
    assert all(f["width"] > 0 for f in shown), shown  # every matched thumbnail decoded in the browser
    assert HOSTILE in [f["name"] for f in shown]  # shown as text, newline and all
    assert dom["bold"] == 0 and dom["scripts"] == 0  # the name's <b> made no element; the page has no script

    shot = tmp_path / "page.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'chrome-shot'}", "--window-size=1100,900",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "<script" not in text  # nothing from a network

    moved = tmp_path / "elsewhere"  # the page and its folder moved together still show every picture
    shutil.copytree(page.parent, moved)
    dom_moved = browser_dom(moved / page.name, tmp_path)
    assert all(f["width"] > 0 for f in dom_moved["figures"] if f["band"] == "match")


def test_report_command_rebuilds_missing_thumbnails(scanned, tmp_path):
    from typer.testing import CliRunner

    from verify.cli import app

    report, page, _ = scanned
    import pandas as pd

    pd.read_csv(report).to_parquet(tmp_path / "report.parquet")
    out = tmp_path / "again.html"
    r = CliRunner().invoke(app, ["report", str(tmp_path / "report.parquet"), "--html", str(out)])
    assert r.exit_code == 0, r.output
    made = sorted(p.name for p in files_dir(out).iterdir())
    assert made == sorted(p.name for p in files_dir(page).iterdir())  # the same faces, cut from the photos
    from PIL import Image

    for name in made[:3]:  # decoded from the original photo instead of during the scan: same picture
        with Image.open(files_dir(out) / name) as a, Image.open(files_dir(page) / name) as b:
            assert a.size == b.size
            assert np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() < 8
    assert "data-count=\"files\">%d<" % csv_counts(report)["files"] in out.read_text(encoding="utf-8")

    r = CliRunner().invoke(app, ["report", str(tmp_path / "missing.csv"), "--html", str(out)])
    assert r.exit_code == 2 and "missing.csv: report not found" in r.output


def test_resume_keeps_the_thumbnails_already_made(scanned, scan_folder, embedder, matcher, tmp_path):
    import pandas as pd

    from verify.faces import DetectorConfig
    from verify.scan import JOURNAL_KIND, JOURNAL_VERSION, COLUMNS

    report, page, summary = scanned
    out, new_page = tmp_path / "r.csv", tmp_path / "p" / "report.html"
    shutil.copytree(page.parent, new_page.parent)
    rows = pd.read_csv(report, keep_default_na=False, na_values=[""]).astype(object)
    rows = rows.where(rows.notna(), None).to_dict("records")
    cut = next(i for i, r in enumerate(rows) if r["path"].endswith("Jennifer_Lopez_0009.jpg"))
    header = {"journal": JOURNAL_KIND, "version": JOURNAL_VERSION, "folders": [str(scan_folder)],
              "model": embedder.fingerprint, "columns": list(COLUMNS)}
    journal_path(out).write_text("".join(json.dumps(r) + "\n" for r in [header] + rows[:cut]))
    thumbs = files_dir(new_page)
    before = {p.name: p.stat().st_mtime_ns for p in thumbs.iterdir()}
    for p in thumbs.iterdir():  # an old timestamp: rewriting a thumbnail would show
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    again = run_scan([scan_folder], embedder=embedder, matcher=matcher, out=out, workers=0, resume=True,
                     detector_config=DetectorConfig(device="cpu", min_face_size=40), html=new_page, progress=False)
    assert again.resumed > 0 and again.matches == summary.matches and again.files == summary.files
    assert all(p.stat().st_mtime_ns == 1_000_000_000 for p in thumbs.iterdir() if p.name in before)
    assert sorted(p.name for p in thumbs.iterdir()) == sorted(before)


def test_page_escapes_every_name():
    evil = '<script>alert("x")</script> & \'quote\''
    rows = [
        {"path": f"/photos/{evil}.jpg", "face": 0, "faces": 1, "status": "face", "x1": 1, "y1": 1, "x2": 9, "y2": 9,
         "identity": evil, "nearest": evil, "distance": 0.3, "threshold": 0.5, "match": True, "far": 1e-3},
        {"path": f"/photos/{evil}.txt", "face": -1, "status": "skipped", "error": f"not an image {evil}"},
    ]
    summary = ScanSummary(report=Path("x"), files=2, images=1, faces=1, matches=1, skipped=1)
    text = render_page(rows, summary, "report_files", PageOptions(), source=evil)
    assert "<script" not in text and "&lt;script&gt;" in text
    assert f'data-identity="{evil}"' not in text and "&quot;x&quot;" in text


def test_near_miss_margin_must_be_a_distance():
    with pytest.raises(ValueError, match="near-miss"):
        PageOptions(near_miss=-0.1)
    with pytest.raises(ValueError, match="near-miss"):
        PageOptions(near_miss=float("nan"))


def test_unmatched_faces_show_only_when_asked():
    base = {"faces": 1, "status": "face", "x1": 1, "y1": 1, "x2": 9, "y2": 9, "far": None, "identity": None}
    rows = [
        {**base, "path": "/p/far.jpg", "face": 0, "nearest": "ann", "distance": 0.9, "threshold": 0.5, "match": False},
        {**base, "path": "/p/none.jpg", "face": 0, "nearest": None, "distance": None, "threshold": 0.5,
         "match": False},
        {**base, "path": "/p/close.jpg", "face": 0, "nearest": "ann", "distance": 0.52, "threshold": 0.5,
         "match": False},
    ]
    summary = ScanSummary(report=Path("x"), files=3, images=3, faces=3)
    default = render_page(rows, summary, "f", PageOptions(), source="r.csv")
    assert "close.jpg" in default and "far.jpg" not in default and "none.jpg" not in default
    assert 'data-band="near"' in default and 'data-band="other"' not in default
    everything = render_page(rows, summary, "f", PageOptions(show_unmatched=True), source="r.csv")
    assert "far.jpg" in everything and "none.jpg" in everything and "no enrolled identity" in everything
