"""Is the LFW filter of scripts/filter_faces.py fair? Its rule (teacher cosine >= 0.95 to any LFW image)
removed a third of the East-Asian faces of SCUT-FBP5500 and All-Age-Faces, people who are not in LFW,
against 2-3% of the Caucasian ones. This compares that rule with a relative one, on the teacher vectors
the filter already stored:

- absolute: best similarity to any LFW image >= T;
- margin: best similarity to one LFW person minus the best to any other LFW person >= M (and the best
  >= a floor F): a face in a crowded part of the teacher's space is close to many people at once, a
  face of an LFW person stands out for that one person.

Catch rate: every LFW image of a person with at least two images here, scored against LFW without that
image (its own person's other photos stay): the fraction a rule would remove. False removals: the
fraction of each prepared set's faces removed (SCUT-FBP5500 by its four groups, from the names of the
source files in its ledger).

    .venv/bin/python scripts/lfw_filter_study.py [--prepared ../extdata/prepared] [--teacher runs/dlib.pt]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from filter_faces import LFW_FLOOR, LFW_SIMILARITY, lfw_vectors, person_scores  # noqa: E402  (scripts/ is on sys.path)

from verify.model.file import Embedder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETS = ("CelebA_Samples", "UTKFace", "AllAgeFaces", "SCUT-FBP5500", "GENKI-4K")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", type=Path, default=REPO.parent / "extdata" / "prepared")
    ap.add_argument("--lfw", type=Path, default=REPO.parent / "shared" / "data" / "lfw" / "lfw-deepfunneled")
    ap.add_argument("--teacher", type=Path, default=REPO / "runs" / "dlib.pt")
    ap.add_argument("--margins", type=float, nargs="+", default=[0.02, 0.015, 0.03, 0.04])
    ap.add_argument("--floor", type=float, default=LFW_FLOOR)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    teacher = Embedder.load(args.teacher, "cpu")
    lfw, names = lfw_vectors(args.lfw, teacher, cache_dir=REPO / ".cache" / "faceverify")
    people_names, people = np.unique(np.asarray(names), return_inverse=True)
    order = np.argsort(people, kind="stable")  # rows grouped by person, as person_scores wants
    lfw, people = lfw[order], people[order]
    counts = np.bincount(people)
    own = np.flatnonzero(counts[people] >= 2)  # LFW images whose person has another image here
    best_l, _, second_l = person_scores(lfw[own], lfw, people, skip=own)

    groups: dict[str, np.ndarray] = {}
    for s in SETS:
        root = args.prepared / s
        npz = next(root.glob("teacher-*.npz"), None)
        if npz is None:
            continue
        with np.load(npz) as z:
            vec, files = z["vectors"], z["names"].tolist()
        ok = np.isfinite(vec).all(axis=1)
        vec, files = vec[ok], [f for f, good in zip(files, ok) if good]
        if s == "SCUT-FBP5500":  # AF/AM/CF/CM: Asian / Caucasian, female / male (source file names)
            src = {}
            for line in (root / "ledger.jsonl").read_text().splitlines():
                r = json.loads(line)
                if r.get("status") == "ok":
                    src[r["out"]] = Path(r["src"]).name[:2]
            tags = np.array([src.get(f, "??") for f in files])
            for g in ("AF", "AM", "CF", "CM"):
                groups[f"SCUT {g}"] = vec[tags == g]
        else:
            groups[s] = vec
    scored = {g: person_scores(v, lfw, people)[::2] for g, v in groups.items()}

    rules = [(f"absolute >= {LFW_SIMILARITY}", lambda b, s: b >= LFW_SIMILARITY)]
    for m in args.margins:
        rules.append((f"margin >= {m} (best >= {args.floor})", lambda b, s, m=m: (b >= args.floor) & (b - s >= m)))
    for m in args.margins[:1]:  # both: a very close face, or one that stands out
        for t in (0.96, 0.97):
            rules.append((f"absolute >= {t} or margin >= {m}",
                          lambda b, s, m=m, t=t: (b >= t) | ((b >= args.floor) & (b - s >= m))))
    header = ["rule", "LFW catch rate", *groups]
    rows = []
    for label, rule in rules:
        rows.append([label, f"{rule(best_l, second_l).mean():.3f}",
                     *(f"{rule(*scored[g]).mean():.3f}" for g in groups)])
    print(f"{len(own)} LFW images of {int((counts >= 2).sum())} people with >= 2 images; "
          + ", ".join(f"{g} {len(v)}" for g, v in groups.items()))
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
