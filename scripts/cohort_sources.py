"""Recover which source each row of the shipped impostor cohort comes from, and write its labels file
(verify/model/cohort.py) beside the model.

The shipped cohort (`extra["cohort"]`, 24,595 float16 rows) was built by `faceverify calibrate` from, in
this order (verify.evaluation.evaluate.cohort_sources, build_cohort: people in order of first
appearance, at most 5 faces per labelled person, unlabelled folders sorted, each face its own person):
LFW pairsDevTrain people, CelebA partition 1 (CelebA_Samples + ../shared/data/celeba), then the held-out
`cohort/` faces of UTKFace, All-Age-Faces, SCUT-FBP5500 and GENKI-4K. Those folders are gone, so:

- LFW rows are found by embedding the LFW photos of ../shared/data exactly as the cohort was built
  (MTCNN, no-face photos skipped) and matching each row to its nearest photo (similarity >= 0.99: the
  same photo; float16 storage moves it by ~1e-3); the person is the photo's folder;
- the CelebA block follows the LFW block up to the first unlabelled row; its rows that match a photo
  of ../shared/data/celeba get that photo's identity, the others are grouped into people by their
  order (a person's faces are consecutive, at most 5) and similarity;
- the unlabelled blocks have the sizes the README's data table gives for the held-out `cohort/` faces
  (UTKFace 9,773, All-Age-Faces 3,656, SCUT-FBP5500 1,811, GENKI-4K 1,674), which must add up to the
  rows after the labelled block; the script checks that and that the boundaries are where the
  rows' statistics change.

    .venv/bin/python scripts/cohort_sources.py --embeddings /tmp/p28/emb_lfw.npz /tmp/p28/emb_celeba.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from verify.data.celeba import load_celeba
from verify.model.cohort import CohortSources, write_cohort_sources
from verify.model.file import DEFAULT_MODEL, Embedder

UNLABELLED = (("utkface", 9773), ("allagefaces", 3656), ("scut-fbp5500", 1811), ("genki-4k", 1674))
SAME_PHOTO = 0.99


def nearest(rows: np.ndarray, photos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, D) rows vs (P, D) photos -> index and similarity of each row's nearest photo."""
    best_i, best_s = np.zeros(len(rows), dtype=np.int64), np.full(len(rows), -2.0, dtype=np.float32)
    for s in range(0, len(rows), 4096):
        sims = rows[s : s + 4096] @ photos.T  # (B, P)
        best_i[s : s + 4096] = sims.argmax(1)
        best_s[s : s + 4096] = sims.max(1)
    return best_i, best_s


def group_consecutive(rows: np.ndarray, max_per_person: int = 5, same_person: float = 0.35) -> np.ndarray:
    """Person keys for rows known to come person by person (at most `max_per_person` each): a new person
    starts when a row is unlike the current person's mean or the current person is full."""
    keys = np.zeros(len(rows), dtype=np.int64)
    k, members = 0, [0]
    for i in range(1, len(rows)):
        centre = rows[members].mean(0)
        centre /= np.linalg.norm(centre)
        if len(members) >= max_per_person or float(rows[i] @ centre) < same_person:
            k, members = k + 1, []
        members.append(i)
        keys[i] = k
    return keys


def boundary_contrast(rows: np.ndarray, b: int, w: int = 400) -> float:
    """Cosine distance between the mean rows just before and just after row `b`."""
    a, c = rows[max(0, b - w) : b].mean(0), rows[b : b + w].mean(0)
    return float(1 - a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--embeddings", type=Path, nargs="+", required=True,
                    help="npz files (vectors, paths) of LFW and CelebA photos embedded as the cohort was built")
    ap.add_argument("--celeba", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data" / "celeba")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()

    emb = Embedder.load(args.model)
    cohort = emb.cohort
    if cohort is None:
        print(f"{args.model}: no cohort", file=sys.stderr)
        return 2
    c = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)
    vecs, paths = [], []
    for f in args.embeddings:
        z = np.load(f)
        ok = np.isfinite(z["vectors"]).all(1)
        vecs.append(z["vectors"][ok])
        paths += [str(p) for p in z["paths"][ok]]
    photos = np.concatenate(vecs)
    idx, sim = nearest(c, photos)
    same = sim >= SAME_PHOTO
    is_lfw = np.array(["lfw-deepfunneled" in p for p in paths])
    lfw_rows = same & is_lfw[idx]
    n_lfw = int(lfw_rows.sum())
    n_unlabelled = sum(n for _, n in UNLABELLED)
    n_labelled = len(c) - n_unlabelled
    print(f"cohort {len(c)} rows; LFW matches {n_lfw}, first non-LFW row {int(np.argmin(lfw_rows))}; "
          f"labelled block {n_labelled} rows by the README's unlabelled counts")
    if not lfw_rows[:n_lfw].all():
        print("LFW rows are not one leading block: the cohort order is not the one this script knows", file=sys.stderr)
        return 2
    if lfw_rows[n_lfw:].any():
        print(f"{int(lfw_rows[n_lfw:].sum())} LFW photos match rows after the LFW block", file=sys.stderr)

    codes = np.zeros(len(c), dtype=np.uint8)
    persons = np.full(len(c), -1, dtype=np.int64)
    names = ["lfw", "celeba"] + [n for n, _ in UNLABELLED]
    lfw_people = {name: i for i, name in enumerate(dict.fromkeys(Path(paths[j]).parent.name for j in idx[:n_lfw]))}
    persons[:n_lfw] = [lfw_people[Path(paths[j]).parent.name] for j in idx[:n_lfw]]
    # CelebA block: identities of the shared sample where a row is one of its photos, else by grouping
    table = load_celeba([args.celeba], need_attributes=False).table
    ident_of = {Path(p).name: int(i) for p, i in zip(table["path"], table["identity"])}
    block = slice(n_lfw, n_labelled)
    codes[block] = 1
    groups = group_consecutive(c[block]) + 10_000_000  # keys apart from CelebA identities
    known = [ident_of.get(Path(paths[j]).name) if s and not is_lfw[j] else None for j, s in zip(idx[block], same[block])]
    # a group with a known member takes its identity (CelebA ids < 10,000,000)
    group_ident = {}
    for g, k in zip(groups, known):
        if k is not None:
            group_ident.setdefault(g, k)
    persons[block] = [group_ident.get(g, g) + 1_000_000 for g in groups]  # LFW keys stay below 1,000,000
    print(f"CelebA block: {n_labelled - n_lfw} rows, {sum(k is not None for k in known)} matched to the shared sample "
          f"({len(set(k for k in known if k is not None))} identities), {len(set(groups))} people by grouping")
    start = n_labelled
    for code, (name, n) in enumerate(UNLABELLED, start=2):
        codes[start : start + n] = code
        start += n
    # the boundaries should be where the rows change: contrast there against nearby offsets
    bounds = np.cumsum([n_lfw, n_labelled - n_lfw] + [n for _, n in UNLABELLED])[:-1]
    for b in bounds:
        here = boundary_contrast(c, int(b))
        around = [boundary_contrast(c, int(b) + o) for o in (-300, -150, 150, 300) if 0 < b + o < len(c)]
        print(f"boundary at row {int(b)}: contrast {here:.4f} (300 and 150 rows off: "
              f"{', '.join(f'{v:.4f}' for v in around)})")
    adjacent = np.sum(c[1:] * c[:-1], axis=1)
    print(f"mean similarity of consecutive rows: labelled {adjacent[: n_labelled - 1].mean():.3f}, "
          f"unlabelled {adjacent[n_labelled:].mean():.3f}")
    labels = CohortSources(codes, tuple(names), persons.astype(np.int32))
    print("faces per source:", labels.counts())
    if not args.dry_run:
        out = write_cohort_sources(args.model, cohort, labels)
        print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
