"""Prepare a folder of face photos as a root that `--data` reads (issue 18, part 1; first stage).

Each image's largest confident MTCNN face is warped by its 5 landmarks onto the median aligned-CelebA
landmarks in the 178x218 frame, as ../shared/data/celeba_wild was made, and written to
OUT/img_align_celeba/. Exact duplicates (same decoded pixels) are dropped. A ledger (OUT/ledger.jsonl,
one line per source image) makes a rerun skip what is done, so an interrupted run resumes.

Names: a CelebA name `NNNNNN.jpg`, or `<identity>_<NNNNNN>.jpg` (ShaharKSegal/CelebA_Samples), keeps its
original CelebA file name so the official identity/partition/attribute files apply; any other name
becomes a stable hash of its relative path (unlabelled sets).

NOT YET DONE (see the issue): near duplicates and LFW matches by the teacher's vector, and an
`unlabelled` root kind in the loader.

    .venv/bin/python scripts/prepare_faces.py SRC --out ROOT [--limit N]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verify.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from verify.faces.align import similarity_transform  # noqa: E402
from verify.faces.detect import FaceDetector  # noqa: E402
from verify.faces.load import ImageLoadError, load_image  # noqa: E402
from verify.model.geometry import CELEBA_FRAME, CELEBA_LANDMARKS  # noqa: E402

log = logging.getLogger("prepare_faces")

_CELEBA_NAME = re.compile(r"^(?:(\d+)_)?(\d{6})\.jpg$", re.IGNORECASE)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".webp"}
MIN_PROB = 0.9  # "confident": the largest face at or above this MTCNN probability


def out_name(rel: str) -> str:
    """The aligned file's name: the original CelebA name when the source name carries it."""
    m = _CELEBA_NAME.match(Path(rel).name)
    if m:
        return f"{m.group(2)}.jpg"
    return hashlib.sha1(rel.encode()).hexdigest()[:16] + ".jpg"


def align_to_frame(image: np.ndarray, landmarks: np.ndarray) -> Image.Image:
    """Warp so the 5 landmarks land on the median aligned-CelebA landmarks in the 178x218 frame."""
    m = similarity_transform(landmarks, np.asarray(CELEBA_LANDMARKS))  # image -> frame
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]  # PIL wants frame -> image
    return Image.fromarray(image).transform(CELEBA_FRAME, Image.Transform.AFFINE, tuple(inv.ravel()),
                                            resample=Image.Resampling.BILINEAR)


def read_ledger(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption: that image is redone
                continue
            done[row["src"]] = row
    return done


def prepare(src: Path, out: Path, limit: int | None = None) -> dict[str, int]:
    # By extension, not content: a corrupt .jpg must be counted as failed, not silently skipped.
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        files = files[:limit]
    img_dir = out / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    ledger_path = out / "ledger.jsonl"
    done = read_ledger(ledger_path)
    seen = {r["pixels"]: r["out"] for r in done.values() if r.get("status") == "ok"}
    detector = FaceDetector()
    with ledger_path.open("a") as ledger:
        for i, p in enumerate(files):
            rel = p.relative_to(src).as_posix()
            if rel in done:
                continue
            row: dict = {"src": rel}
            try:
                image = load_image(p)
                faces = [f for f in detector.detect([image])[0] if f.prob >= MIN_PROB]
                if not faces:
                    row.update(status="failed", why="no confident face")
                else:
                    aligned = align_to_frame(image, faces[0].landmarks)
                    buf = io.BytesIO()
                    aligned.save(buf, format="JPEG", quality=95)
                    digest = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
                    name = out_name(rel)
                    if digest in seen:  # same pixels as an earlier image: exact duplicate
                        row.update(status="exact_dup", of=seen[digest])
                    elif (img_dir / name).exists():  # two sources claim one name: first wins
                        row.update(status="name_taken", out=name)
                    else:
                        atomic_write_bytes(img_dir / name, buf.getvalue())
                        seen[digest] = name
                        row.update(status="ok", out=name, pixels=digest)
            except (ImageLoadError, OSError, ValueError) as exc:  # one bad image never stops the run
                row.update(status="failed", why=f"{type(exc).__name__}: {exc}"[:200])
            ledger.write(json.dumps(row) + "\n")
            ledger.flush()
            done[rel] = row
            if (i + 1) % 200 == 0:
                log.info("%d / %d images", i + 1, len(files))
    counts = {"in": len(files)}
    for r in done.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    failed = sorted(f"{r['src']}\t{r.get('why', '')}" for r in done.values() if r["status"] == "failed")
    atomic_write_text(out / "failed.txt", "".join(line + "\n" for line in failed))
    atomic_write_text(out / "counts.json", json.dumps(counts, indent=1) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not a.src.is_dir():
        print(f"error: {a.src} is not a folder", file=sys.stderr)
        return 2
    print(json.dumps(prepare(a.src, a.out, a.limit)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
