"""Second stage of preparing a face set (issue 18): drop near duplicates and faces of LFW people, by the
teacher's vector.

Input: roots written by scripts/prepare_faces.py (ROOT/img_align_celeba/*.jpg in the CelebA frame).
Each face is embedded once by the teacher (`faceverify model import-dlib`, dlib's network) on its own
crop box of the CelebA frame; the vectors are kept in ROOT/teacher-<fingerprint>.npz, so a rerun
embeds only new files. Then, in the order the roots are given (a face of an earlier root wins):

- LFW: a face whose teacher cosine similarity to any image of an LFW person under `--lfw` is at least
  `--lfw-similarity` is removed, so that LFW figures stay honest (the matched LFW name is logged).
  With `--lfw-margin M`, the rule is relative instead: removed when the best similarity to one LFW
  person is at least `--lfw-floor` and beats the best to any other LFW person by M. The absolute rule
  removes a third of East-Asian faces of people not in LFW (dlib's vectors crowd there); the margin
  rule at 0.015 catches as many LFW people and removes 2.6-3.4% of them (scripts/lfw_filter_study.py,
  README);
- near duplicates: a face at least `--dup-similarity` from a kept face (of any root given, or of a
  `--reference` root, whose faces are never removed) is removed.

For an unlabelled set (no CelebA names), `--cohort F --strangers G` then move a fixed, name-hashed
fraction F of the kept faces to ROOT/cohort/ (the impostor cohort of `faceverify calibrate --faces`)
and G to ROOT/strangers/ (scripts/far_check.py --strangers-dir): training never sees them, and the
two never share a face.

Removed files are moved to ROOT/removed/ (nothing is deleted), listed in ROOT/removed.tsv with the
reason, what they matched and the similarity, and counted in ROOT/counts.json. The rest stays in
ROOT/img_align_celeba/, which is what `--data` reads.

    .venv/bin/python scripts/filter_faces.py ROOT... --teacher runs/dlib.pt \
        --lfw ../shared/data/lfw/lfw-deepfunneled [--reference ../shared/data/celeba]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verify.atomic import atomic_path, atomic_write_text  # noqa: E402
from verify.data.celeba import IMAGE_DIR  # noqa: E402
from verify.evaluation.evaluate import embed_images  # noqa: E402
from verify.model.file import Embedder  # noqa: E402

log = logging.getLogger("filter_faces")

REMOVED_DIR = "removed"
# Chosen on data with dlib's network (README, Data): the same CelebA photo aligned twice (celeba and
# celeba_wild) scores >= 0.985 in 95% of 180 cases; 1 of 17.9M CelebA pairs of different identities does.
DUP_SIMILARITY = 0.985
# dlib's vectors sit in a narrow cone: LFW impostor pairs reach 0.953 at 1e-5. At 0.95, 61% of LFW
# same-person pairs match, and 3.0% of GENKI-4K's faces (people not in LFW) are removed by chance.
LFW_SIMILARITY = 0.95
# The relative rule (--lfw-margin): at 0.015 above a 0.90 floor it catches the same 75% of LFW people's
# images as 0.95 does (scripts/lfw_filter_study.py).
LFW_FLOOR = 0.90


@dataclass
class Root:
    path: Path
    names: list[str]  # image file names under IMAGE_DIR, sorted
    vectors: np.ndarray  # (N, D) float32 unit teacher vectors; NaN rows: unreadable


def root_images(root: Path) -> list[Path]:
    folder = root / IMAGE_DIR if (root / IMAGE_DIR).is_dir() else root
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def teacher_vectors(root: Path, teacher: Embedder, *, store: bool = True, progress: bool = True) -> Root:
    """The teacher's vector of every image in `root` (aligned: the teacher's box of the CelebA frame),
    reusing ROOT/teacher-<fingerprint>.npz for images embedded before."""
    paths = root_images(root)
    names = [p.name for p in paths]
    cache_path = root / f"teacher-{teacher.fingerprint}.npz"
    known: dict[str, np.ndarray] = {}
    if cache_path.exists():
        with np.load(cache_path) as z:
            known = dict(zip(z["names"].tolist(), z["vectors"]))
    todo = [p for p in paths if p.name not in known]
    if todo:
        log.info("%s: the teacher embeds %d of %d images", root, len(todo), len(paths))
        emb, errors = embed_images(todo, teacher, aligned=True, progress=progress)
        for p, v, err in zip(todo, emb, errors):
            if err:
                log.warning("%s", err)
            known[p.name] = v
        if store:
            with atomic_path(cache_path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, names=np.array(sorted(known)), vectors=np.stack([known[n] for n in sorted(known)]))
    vectors = np.stack([known[n] for n in names]).astype(np.float32) if names else np.zeros((0, teacher.dim), np.float32)
    return Root(root, names, vectors)


def lfw_vectors(lfw_root: Path, teacher: Embedder, progress: bool = True, cache_dir: Path | None = None
                ) -> tuple[np.ndarray, list[str]]:
    """Teacher vectors of every LFW image under `lfw_root` (NAME/NAME_0001.jpg), detected and aligned
    as the evaluation does; images without a face are left out. With `cache_dir`, kept there (keyed by
    the teacher and the file list: detection is the slow part)."""
    paths = sorted(lfw_root.rglob("*.jpg"))
    if not paths:
        raise ValueError(f"{lfw_root}: no LFW images")
    key = hashlib.sha1("\n".join([teacher.fingerprint, *map(str, paths)]).encode()).hexdigest()[:12]
    cached = cache_dir / f"lfw-teacher-{key}.npy" if cache_dir else None
    if cached is not None and cached.exists():
        emb = np.load(cached)
    else:
        emb, _ = embed_images(paths, teacher, progress=progress, no_face="fail")
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cached) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, emb)
    ok = np.isfinite(emb).all(axis=1)
    log.info("LFW: %d images of %d people (%d without a face)", int(ok.sum()),
             len({p.parent.name for p in paths}), int((~ok).sum()))
    return emb[ok], [p.parent.name for p, good in zip(paths, ok) if good]


def person_scores(queries: np.ndarray, gallery: np.ndarray, people: np.ndarray, skip: np.ndarray | None = None,
                  block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: the best cosine similarity to one gallery person (the max over their rows), that
    person's index, and the best similarity to any other person (-inf with one person). `people`: each
    gallery row's person index, in ascending order (rows grouped by person). `skip[i]`: a gallery row
    query i must not use (itself), or -1. NaN queries: -inf."""
    people = np.asarray(people)
    if np.any(np.diff(people) < 0):
        raise ValueError("gallery rows must be grouped by person, in ascending order")
    starts = np.flatnonzero(np.r_[True, np.diff(people) != 0])  # first row of each person
    person_of = people[starts]
    best = np.full(len(queries), -np.inf, np.float32)
    second = np.full(len(queries), -np.inf, np.float32)
    who = np.full(len(queries), -1, np.int64)
    q = np.nan_to_num(queries, nan=0.0)
    for s in range(0, len(q), block):
        sim = q[s : s + block] @ gallery.T  # (b, G)
        if skip is not None:
            rows = np.flatnonzero(skip[s : s + block] >= 0)
            sim[rows, skip[s : s + block][rows]] = -np.inf
        per = np.maximum.reduceat(sim, starts, axis=1)  # (b, P): best per person
        top = np.argmax(per, axis=1)
        best[s : s + block] = per[np.arange(len(per)), top]
        per[np.arange(len(per)), top] = -np.inf
        second[s : s + block] = per.max(axis=1)
        who[s : s + block] = person_of[top]
    bad = ~np.isfinite(queries).all(axis=1)
    best[bad], second[bad] = -np.inf, -np.inf
    return best, who, second


def lfw_matches(vectors: np.ndarray, lfw_emb: np.ndarray, lfw_names: list[str], *, similarity: float,
                margin: float | None = None, floor: float = LFW_FLOOR) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(removed mask, matched LFW name per face, best similarity per face) under the absolute rule
    (best >= `similarity`) or, with `margin`, the relative one (best >= `floor` and best - the best of
    any other LFW person >= `margin`)."""
    if not len(lfw_names):
        return np.zeros(len(vectors), bool), [""] * len(vectors), np.full(len(vectors), -np.inf, np.float32)
    names, people = np.unique(np.asarray(lfw_names), return_inverse=True)
    order = np.argsort(people, kind="stable")
    best, who, second = person_scores(vectors, lfw_emb[order], people[order])
    drop = best >= similarity if margin is None else (best >= floor) & (best - second >= margin)
    return drop, [str(names[w]) if w >= 0 else "" for w in who], best


def near_duplicates(vectors: np.ndarray, threshold: float, n_fixed: int = 0, block: int = 4096) -> np.ndarray:
    """(N,) int64: for each row, the earlier kept row it duplicates (similarity >= threshold), or -1.

    Greedy in row order: a row is kept unless an earlier *kept* row is that close. The first `n_fixed`
    rows (reference faces) are always kept. NaN rows are never duplicates."""
    n = len(vectors)
    of = np.full(n, -1, np.int64)
    v = np.nan_to_num(vectors, nan=0.0).astype(np.float32)
    kept = np.ones(n, bool)
    for s in range(0, n, block):
        e = min(n, s + block)
        sim = v[s:e] @ v[:e].T  # (b, e): against every row up to the block's end
        # Only the close pairs need the greedy pass: (row, earlier column), row-major, so ascending rows
        # and, per row, ascending columns; an earlier row's decision is final when a later one reads it.
        rows, cols = np.nonzero(sim >= threshold)
        rows += s
        earlier = (cols < rows) & (rows >= n_fixed)
        for i, j in zip(rows[earlier].tolist(), cols[earlier].tolist()):
            if kept[i] and kept[j]:
                of[i] = j
                kept[i] = False
    return of


def filter_roots(roots: list[Root], lfw: tuple[np.ndarray, list[str]] | None, references: list[Root], *,
                 dup_similarity: float, lfw_similarity: float, lfw_margin: float | None = None,
                 lfw_floor: float = LFW_FLOOR, dry_run: bool = False) -> dict[str, dict]:
    """Decide, move and record what each root loses (the LFW rule: `lfw_matches`). Returns counts per root."""
    lfw_emb, lfw_names = lfw if lfw is not None else (np.zeros((0, 1), np.float32), [])
    ref = np.concatenate([r.vectors for r in references]) if references else np.zeros((0, roots[0].vectors.shape[1]), np.float32)
    labels = [f"{r.path}/{n}" for r in references for n in r.names]
    decisions: list[list[tuple[str, str, float] | None]] = []
    lfw_drop = []
    for r in roots:
        drop, matched, sim = lfw_matches(r.vectors, lfw_emb, lfw_names, similarity=lfw_similarity,
                                         margin=lfw_margin, floor=lfw_floor)
        lfw_drop.append(drop)
        decisions.append([("lfw_match", matched[i], float(sim[i])) if drop[i] else None for i in range(len(r.names))])
    # near duplicates among the faces that survive the LFW filter, reference faces first
    cand = [(ri, i) for ri, r in enumerate(roots) for i in range(len(r.names)) if not lfw_drop[ri][i]]
    vecs = np.concatenate([ref] + [roots[ri].vectors[[i for rj, i in cand if rj == ri]] for ri in range(len(roots))])
    of = near_duplicates(vecs, dup_similarity, n_fixed=len(ref))
    labels += [f"{roots[ri].path}/{roots[ri].names[i]}" for ri, i in cand]
    v = np.nan_to_num(vecs, nan=0.0)
    for k, (ri, i) in enumerate(cand):
        j = of[len(ref) + k]
        if j >= 0:
            decisions[ri][i] = ("near_dup", labels[j], float(v[len(ref) + k] @ v[j]))
    counts = {}
    for r, dec in zip(roots, decisions):
        removed = [(n, d) for n, d in zip(r.names, dec) if d is not None]
        c = {"kept": len(r.names) - len(removed), "lfw_match": sum(d[0] == "lfw_match" for _, d in removed),
             "near_dup": sum(d[0] == "near_dup" for _, d in removed)}
        counts[str(r.path)] = c
        log.info("%s: %d kept, %d LFW matches, %d near duplicates removed", r.path, c["kept"], c["lfw_match"],
                 c["near_dup"])
        if dry_run:
            continue
        lfw_rule = ({"lfw_similarity": lfw_similarity} if lfw_margin is None
                    else {"lfw_margin": lfw_margin, "lfw_floor": lfw_floor})
        _record(r.path, removed, c, {"dup_similarity": dup_similarity, **lfw_rule})
    return counts


def _record(root: Path, removed: list[tuple[str, tuple[str, str, float]]], counts: dict, rule: dict) -> None:
    """Append to removed.tsv, then move the files: a rerun after an interruption finds the rest."""
    folder = root / IMAGE_DIR
    (root / REMOVED_DIR).mkdir(exist_ok=True)
    tsv = root / "removed.tsv"
    if not tsv.exists():
        tsv.write_text("name\treason\tmatched\tsimilarity\n")
    with tsv.open("a") as f:
        for name, (why, what, sim) in removed:
            f.write(f"{name}\t{why}\t{what}\t{sim:.4f}\n")
    for name, _ in removed:
        (folder / name).replace(root / REMOVED_DIR / name)
    stats_path = root / "counts.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats["lfw_match"] = stats.get("lfw_match", 0) + counts["lfw_match"]
    stats["near_dup"] = stats.get("near_dup", 0) + counts["near_dup"]
    stats["kept"] = counts["kept"]
    stats["filter"] = rule
    atomic_write_text(stats_path, json.dumps(stats, indent=1) + "\n")


def name_fraction(name: str) -> float:
    """A stable number in [0, 1) from a file name: the same split on every machine and rerun."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32


def hold_out(root: Path, cohort: float, strangers: float) -> dict[str, int]:
    """Move the kept faces whose name fraction is below `cohort` to ROOT/cohort/, the next `strangers`
    to ROOT/strangers/. Idempotent: moved faces are no longer in the image folder."""
    if cohort < 0 or strangers < 0 or cohort + strangers >= 1:
        raise ValueError(f"--cohort {cohort} and --strangers {strangers} must be >= 0 and leave faces to train on")
    moved = {"cohort": 0, "strangers": 0}
    for p in root_images(root):
        f = name_fraction(p.name)
        part = "cohort" if f < cohort else "strangers" if f < cohort + strangers else None
        if part:
            (root / part).mkdir(exist_ok=True)
            p.replace(root / part / p.name)
            moved[part] += 1
    stats_path = root / "counts.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    for part in moved:
        d = root / part
        stats[part] = sum(1 for _ in d.iterdir()) if d.is_dir() else 0
    stats["kept"] = len(root_images(root))
    stats["held_out"] = {"cohort": cohort, "strangers": strangers}
    atomic_write_text(stats_path, json.dumps(stats, indent=1) + "\n")
    log.info("%s: %d faces to train on, %d cohort, %d strangers", root, stats["kept"], stats["cohort"],
             stats["strangers"])
    return moved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", type=Path, nargs="+")
    ap.add_argument("--teacher", type=Path, required=True, help="runs/dlib.pt (faceverify model import-dlib)")
    ap.add_argument("--lfw", type=Path, help="LFW images (NAME/NAME_0001.jpg): their people are removed")
    ap.add_argument("--reference", type=Path, action="append", default=[],
                    help="a root whose faces are kept and count for near duplicates (repeatable)")
    ap.add_argument("--dup-similarity", type=float, default=DUP_SIMILARITY)
    ap.add_argument("--lfw-similarity", type=float, default=LFW_SIMILARITY, help="the absolute LFW rule")
    ap.add_argument("--lfw-margin", type=float, default=None,
                    help="the relative LFW rule instead (0.015: as many LFW people caught, far fewer others)")
    ap.add_argument("--lfw-floor", type=float, default=LFW_FLOOR, help="with --lfw-margin: the least best similarity")
    ap.add_argument("--cohort", type=float, default=0.0, help="fraction of each root held out for the cohort")
    ap.add_argument("--strangers", type=float, default=0.0, help="fraction held out as strangers for far_check")
    ap.add_argument("--dry-run", action="store_true", help="count only; move nothing")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for r in [*a.roots, *a.reference]:
        if not r.is_dir():
            print(f"error: {r} is not a folder", file=sys.stderr)
            return 2
    teacher = Embedder.load(a.teacher)
    roots = [teacher_vectors(r, teacher) for r in a.roots]
    refs = [teacher_vectors(r, teacher, store=False) for r in a.reference]
    lfw = lfw_vectors(a.lfw, teacher, cache_dir=Path(".cache/faceverify")) if a.lfw else None
    counts = filter_roots(roots, lfw, refs, dup_similarity=a.dup_similarity, lfw_similarity=a.lfw_similarity,
                          lfw_margin=a.lfw_margin, lfw_floor=a.lfw_floor, dry_run=a.dry_run)
    if (a.cohort or a.strangers) and not a.dry_run:
        for r in a.roots:
            counts[str(r)].update(hold_out(r, a.cohort, a.strangers))
    print(json.dumps(counts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
