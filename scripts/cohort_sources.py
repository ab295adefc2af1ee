"""Recover which source each row of the shipped impostor cohort comes from, and write its labels file
(verify/model/cohort.py) beside the model.

The shipped cohort (`extra["cohort"]`, 24,595 float16 rows) was built by `faceverify calibrate` from, in
this order (verify.evaluation.evaluate.cohort_sources, build_cohort: people in order of first
appearance, at most 5 faces per labelled person, unlabelled folders sorted, each face its own person):
LFW pairsDevTrain people, CelebA partition 1 (CelebA_Samples + ../shared/data/celeba), then the held-out
`cohort/` faces of UTKFace, All-Age-Faces, SCUT-FBP5500 and GENKI-4K. Those folders are gone, so:

- LFW rows are found by embedding the LFW photos of ../shared/data exactly as the cohort was built
  (MTCNN, no-face photos skipped) and matching each row to its nearest photo (similarity >= 0.9: the
  same photo, measured 0.97-1.0 as the cohort was embedded in another run; strangers stay below 0.8);
  the person is the photo's folder (a row of the block that matches no photo: person unknown, -1);
- the CelebA block follows the LFW block up to the first unlabelled row; its rows that match a photo
  of ../shared/data/celeba get that photo's identity, the others are grouped into people by their
  order (a person's faces are consecutive, at most 5) and similarity;
- the labelled block (LFW + CelebA, people of at most 5 faces in a row) ends where consecutive rows
  stop resembling each other (the last run of similar rows, searched around the end that the README's
  held-out `cohort/` counts give: UTKFace 9,773, All-Age-Faces 3,656, SCUT-FBP5500 1,811, GENKI-4K
  1,674; fewer rows made it, as photos where MTCNN found no face were skipped);
- the unlabelled blocks' boundaries are the change points of the rows' mean (least within-block
  squared distance, refined around the README's counts): measured 9,704 / 3,655 / 1,802 / 1,648 rows,
  each at most its README count, as they must be. A boundary off by a few rows mislabels a few faces
  of ~17,000: immaterial to per-source thresholds.

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
SAME_PHOTO = 0.9  # the same photo: measured 0.97-1.0 (the cohort was embedded in another run), strangers < 0.8


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


def labelled_end(rows: np.ndarray, guess: int, search: int = 300, same: float = 0.35) -> int:
    """First row after the labelled block: after the last run of >= 4 consecutive similar rows (one
    person's faces: every similarity >= `same`, their mean >= 0.5; UTKFace's rows, sorted by age, sex
    and race in their file names, make weaker runs) within `search` rows past `guess` (fewer unlabelled rows than the README counts
    move the true end later, never earlier)."""
    adj = np.sum(rows[1:] * rows[:-1], axis=1)  # adj[i]: row i vs row i + 1
    end = guess
    for i in range(guess - search, min(len(adj) - 3, guess + search)):
        run = adj[i : i + 3]
        if run.min() >= same and run.mean() >= 0.5:
            end = i + 4
    return end


def change_points(rows: np.ndarray, bounds: list[int], reach: int = 400, rounds: int = 3) -> list[int]:
    """Refine the inner boundaries of consecutive blocks (first and last fixed) to the least total
    within-block squared distance to the block means, each within `reach` rows of where it was."""
    x = rows.astype(np.float64)
    cs = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])
    sq = np.concatenate([[0.0], np.cumsum((x * x).sum(1))])

    def cost(a: int, b: int) -> float:
        s = cs[b] - cs[a]
        return float(sq[b] - sq[a] - s @ s / (b - a))

    b = list(bounds)
    for _ in range(rounds):
        for k in range(1, len(b) - 1):
            cand = range(max(b[k - 1] + 1, b[k] - reach), min(b[k + 1] - 1, b[k] + reach))
            b[k] = cand[int(np.argmin([cost(b[k - 1], t) + cost(t, b[k + 1]) for t in cand]))]
    return b


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
    n_lfw = int(np.flatnonzero(lfw_rows).max()) + 1  # the LFW block ends at its last matched row
    n_labelled = labelled_end(c, len(c) - sum(n for _, n in UNLABELLED))
    unmatched = np.flatnonzero(~lfw_rows[:n_lfw])
    print(f"cohort {len(c)} rows; LFW block rows 0-{n_lfw - 1}: {int(lfw_rows.sum())} matched to an LFW photo "
          f"(similarity >= {SAME_PHOTO}), {len(unmatched)} not (rows {unmatched.tolist()}: another face of the photo "
          f"or a photo embedded differently); labelled block {n_labelled} rows")
    if len(unmatched) > 0.01 * n_lfw or n_lfw >= n_labelled:
        print("LFW rows are not one leading block: the cohort order is not the one this script knows", file=sys.stderr)
        return 2

    codes = np.zeros(len(c), dtype=np.uint8)
    persons = np.full(len(c), -1, dtype=np.int64)
    names = ["lfw", "celeba"] + [n for n, _ in UNLABELLED]
    lfw_people = {name: i for i, name in enumerate(dict.fromkeys(Path(paths[j]).parent.name for j in idx[:n_lfw]))}
    persons[:n_lfw] = [lfw_people[Path(paths[j]).parent.name] if m else -1 for j, m in zip(idx[:n_lfw], lfw_rows[:n_lfw])]
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
    bounds = [n_labelled]
    for _, n in UNLABELLED[:-1]:
        bounds.append(bounds[-1] + n)
    bounds = change_points(c, [n_labelled, *bounds[1:], len(c)])
    for code, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=2):
        codes[a:b] = code
    print("unlabelled blocks (rows, README count):",
          ", ".join(f"{name} {b - a} ({n})" for (name, n), a, b in zip(UNLABELLED, bounds[:-1], bounds[1:])))
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
