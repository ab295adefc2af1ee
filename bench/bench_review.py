"""`faceverify review` and decisions: the review page of one person with many matched faces, a
decision's round trip, and `find` with many decisions against none.

    .venv/bin/python bench/bench_review.py [--faces 1000] [--baseline-faces 100] [--decisions 1000]
        [--repeats 5]

Data: a library index whose faces are real LFW photos (deep-funneled, 250 x 250, one face each, box
in the middle; read in place) with synthetic embeddings: `--faces` of them close to one enrolled
person "ann" (all matched), 10% more just over her threshold (near misses), and a gallery of ann
under the shipped model's fingerprint (a confirm embeds real views with the shipped model). A second
library with `--baseline-faces` matched faces is the baseline the page figures are compared with.

Rows:
- page TTFB: time to the first byte of /person?name=ann (urllib; median of --repeats).
- page load (Chromium): headless Chromium through Selenium, navigation start -> load event (the
  thumbnails in view load before it; the rest are lazy); "all thumbnails": the page scrolled to the
  end until every thumbnail has arrived.
- reject round trip: POST /decide (one SQLite transaction) -> JSON answer; median over 20 faces.
- confirm round trip: the same for a confirm, which also embeds the face and 8 augmented views into
  the gallery (the model loads on the first one: that one is left out; median of 3).
- find: `verify.queries.find.find(names=["ann"])` writing a CSV, with no decision and with
  --decisions decisions ("reject bob" on as many faces: every face has a verdict to apply, the answer
  stays the same); median of --repeats after one untimed call.
Figures as ratios against the baseline row of the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LFW, REPO, print_table, ratio  # noqa: E402

sys.path.insert(0, str(REPO))
from index import Gallery  # noqa: E402
from index.library import FaceRecord, FileRecord, Library  # noqa: E402


def lfw_photos(n: int) -> list[Path]:
    photos = sorted(LFW.glob("*/*.jpg"))
    if len(photos) < n:
        raise SystemExit(f"{LFW}: {len(photos)} photos, {n} needed")
    return photos[:n]


def build(folder: Path, n_matched: int, fingerprint: str, dim: int, threshold: float, seed: int = 0) -> tuple[Path, Path]:
    """(index, gallery) with n_matched faces of ann and n_matched // 10 near misses."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(dim).astype(np.float32)
    centre /= np.linalg.norm(centre)

    def around(cos: float, n: int) -> np.ndarray:  # (n, D) unit vectors at cosine `cos` to the centre
        noise = rng.standard_normal((n, dim)).astype(np.float32)
        noise -= (noise @ centre)[:, None] * centre
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        return (cos * centre + np.sqrt(1 - cos ** 2) * noise).astype(np.float32)

    n_near = max(1, n_matched // 10)
    photos = lfw_photos(n_matched + n_near)
    # matched: similarity to ann's pooled photos well above the threshold; near: just below it
    vectors = np.concatenate([around(min(0.95, threshold + 0.35), n_matched), around(threshold - 0.25, n_near)])
    db = folder / "lib.db"
    lib = Library.open(db)
    lib.ensure_model(fingerprint, dim)
    box = (75.0, 70.0, 175.0, 190.0)
    lm = np.array([[100, 110], [150, 110], [125, 135], [105, 160], [145, 160]], np.float32)
    records = []
    for p, v in zip(photos, vectors):
        st = p.stat()
        records.append(FileRecord(str(p), str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, "face",
                                  sha256=hashlib.sha256(p.read_bytes()).hexdigest(), detector="bench",
                                  faces=[FaceRecord(box, 0.99, lm)], embeddings=v[None]))
    for i in range(0, len(records), 256):
        lib.record(records[i:i + 256], fingerprint)
    lib.close()
    g = Gallery.create(folder / "gallery", dim, fingerprint, threshold=threshold)
    g.add(around(0.97, 5), "ann", sources=[f"ann{i}" for i in range(5)],
          sha256s=[hashlib.sha256(str(i).encode()).hexdigest() for i in range(5)])
    g.save()
    g.close()
    return db, folder / "gallery"


def start(db: Path, gallery: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "verify", "review", "--index", str(db), "--gallery", str(gallery),
                             "--no-browser", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc, proc.stdout.readline().strip()


def ttfb(url: str, repeats: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=120) as r:
            r.read(1)
            times.append(time.perf_counter() - t0)
            size = 1 + len(r.read())
    return float(np.median(times)), size


def chromium_load(url: str, profile: Path) -> tuple[float, float, int]:
    """(navigation -> load event s, -> every thumbnail arrived s, thumbnails)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                "--window-size=1280,900"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        t0 = time.perf_counter()
        browser.get(url)  # returns after the load event
        timing = browser.execute_script("const t = performance.timing; return [t.navigationStart, t.loadEventEnd]")
        load = (timing[1] - timing[0]) / 1000
        browser.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
        n = 0
        while True:
            done, n = browser.execute_script(
                "const a = Array.from(document.querySelectorAll('.face img'));"
                "return [a.every(i => i.complete && i.naturalWidth > 0), a.length]")
            if done or time.perf_counter() - t0 > 300:
                break
            time.sleep(0.05)
        return load, time.perf_counter() - t0, n
    finally:
        browser.quit()


def post(url: str, path: str, payload: dict) -> float:
    token = url.split("token=")[1]
    req = urllib.request.Request(url.split("/?")[0] + path, data=json.dumps(payload).encode(), method="POST",
                                 headers={"X-Token": token, "Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        json.loads(r.read())
    return time.perf_counter() - t0


def find_seconds(db: Path, gallery: Path, out: Path, repeats: int) -> tuple[float, int]:
    from verify.queries.find import find

    times, rows = [], 0
    for i in range(repeats + 1):  # the first (imports, page cache) is not timed
        lib, g = Library.open(db, readonly=True), Gallery.open(gallery)
        t0 = time.perf_counter()
        rows = find(lib, g, names=["ann"], out=out).rows
        if i:
            times.append(time.perf_counter() - t0)
        lib.close()
        g.close()
    return float(np.median(times)), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=1000)
    ap.add_argument("--baseline-faces", type=int, default=100)
    ap.add_argument("--decisions", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from verify.model.runtimes import load_embedder

    embedder = load_embedder(None, "cpu", "onnx")
    threshold = float(embedder.similarity_threshold)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_review_") as tmp:
        tmp = Path(tmp)
        page = {}
        for label, n in (("baseline", args.baseline_faces), ("measured", args.faces)):
            folder = tmp / label
            folder.mkdir()
            db, g = build(folder, n, embedder.fingerprint, embedder.dim, threshold)
            proc, url = start(db, g)
            try:
                person = url.replace("/?", "/person?") + "&name=ann"
                first, size = ttfb(person, args.repeats)
                load, full, thumbs = chromium_load(person, folder / "profile")
                page[label] = (n, first, size, load, full, thumbs)
                if label == "measured":
                    face_ids = list(range(1, 21))
                    reject = float(np.median([post(url, "/decide", {"face_id": f, "kind": "reject", "name": "ann"})
                                              for f in face_ids]))
                    post(url, "/decide", {"face_id": 30, "kind": "confirm", "name": "ann"})  # loads the model
                    confirm = float(np.median([post(url, "/decide", {"face_id": f, "kind": "confirm", "name": "ann"})
                                               for f in (31, 32, 33)]))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            if label == "measured":
                # find: none vs many decisions, on a fresh copy of the measured library
                clean = tmp / "find"
                clean.mkdir()
                db2, g2 = build(clean, n, embedder.fingerprint, embedder.dim, threshold)
                none_s, none_rows = find_seconds(db2, g2, clean / "f.csv", args.repeats)
                lib = Library.open(db2)
                shas = [s.sha256 for s in lib.files().values()][:args.decisions]
                lib.add_decisions([("reject", sha, 0, "bob", None) for sha in shas], "bench")
                lib.close()
                many_s, many_rows = find_seconds(db2, g2, clean / "f.csv", args.repeats)
                assert many_rows == none_rows, (many_rows, none_rows)
    b = page["baseline"]
    m = page["measured"]
    print(f"# review page of one person; LFW photos, synthetic embeddings; chromium headless; {args.repeats} repeats")
    print_table(["measure", f"{b[0]} matched faces (baseline)", f"{m[0]} matched faces", "ratio"], [
        ["page TTFB s", f"{b[1]:.3f}", f"{m[1]:.3f}", ratio(m[1], b[1])],
        ["page bytes", b[2], m[2], ratio(m[2], b[2])],
        ["Chromium load event s", f"{b[3]:.3f}", f"{m[3]:.3f}", ratio(m[3], b[3])],
        ["Chromium all thumbnails s", f"{b[4]:.2f} ({b[5]})", f"{m[4]:.2f} ({m[5]})", ratio(m[4], b[4])],
    ])
    print()
    print_table(["measure", "seconds", "ratio to reject"], [
        ["reject round trip (median of 20)", f"{reject:.4f}", "1.00x"],
        ["confirm round trip, 8 views (median of 3)", f"{confirm:.3f}", ratio(confirm, reject)],
    ])
    print()
    print_table(["find ann", "seconds", "rows", "ratio"], [
        ["no decision (baseline)", f"{none_s:.3f}", none_rows, "1.00x"],
        [f"{args.decisions} decisions", f"{many_s:.3f}", many_rows, ratio(many_s, none_s)],
    ])


if __name__ == "__main__":
    main()
