"""Strangers who look like the enrolled person (issue 28): measured against promised FAR, per stranger
source and enrollment size, for today's rule (pooled cohort) and the per-source rule (hardest source),
side by side on the same decisions.

    .venv/bin/python scripts/far_same_domain.py --cache /tmp/far_same_domain [--counts 1 5 30 45]

Sources (one decision per (enrolled person, stranger face); photos embedded once each, central face,
MTCNN as `faceverify calibrate` builds the cohort; photos without a face left out):
- LFW DevTest: enroll pairsDevTest people (not in the cohort), strangers = the other DevTest people;
- celeba_wild: enroll the partition-2 identities of ../shared/data/celeba_wild (never trained on, not
  in the cohort), strangers = the other partition-2 identities' photos there;
- CelebA same sex and age: enroll the partition-2 identities of ../shared/data/celeba, strangers = the
  partition-2 photos (celeba, celeba_wild, celeba_half) of other identities whose CelebA `Male` and
  `Young` attributes equal the enrolled person's (majority over their photos); and all of them.
Enrollment uses each person's first N photos without augmented views (`enroll` adds 8 views each; this
check leaves them out to fit the machine: both rules see the same pooled vectors). A person enters a
size with at least N photos; its photos after the first N are its genuine probes (TAR: the share of
them accepted, shown where there are any). A third rule, beside today's and the hardest source: the hardest source
with each source's threshold at target FAR x `--lookalike-share` (the share of a source that looks like
the person: CelebA same sex and age band strangers are 40% of its partition-2 strangers here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from far_check import wilson  # noqa: E402

from verify.data.celeba import load_celeba  # noqa: E402
from verify.evaluation.evaluate import embed_images, lfw_people_images  # noqa: E402
from verify.identity.scoring import RULE_HARDEST_SOURCE, RULE_POOLED, calibrate_identity, identity_scores, normalise  # noqa: E402
from verify.model.file import Embedder  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# label -> calibrate_identity keywords (None: the pooled rule)
RULES = {"today (pooled cohort)": None, "hardest source": {}, "hardest source, shift from 10x FAR": {"shift_depth": 10.0},
         "look-alike share": "share", "look-alike share, shift from 10x FAR": "share+shift"}


def embedded(paths: list[Path], emb: Embedder, cache: Path | None, name: str) -> np.ndarray:
    """(N, D) central-face vectors of `paths` (NaN rows: no face), cached as `cache/name.npz`."""
    f = cache / f"{name}.npz" if cache else None
    if f is not None and f.is_file():
        z = np.load(f)
        if list(z["paths"]) == [str(p) for p in paths]:
            return z["vectors"]
    v, _ = embed_images(paths, emb, no_face="fail", progress=False)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        np.savez(f, vectors=v, paths=np.array([str(p) for p in paths]))
    return v


def held_out_of_cohort(vectors: np.ndarray, cohort: np.ndarray, same: float = 0.9) -> np.ndarray:
    """The rows of `vectors` with a face (finite) and no cohort face within similarity `same` (the same photo)."""
    v = normalise(vectors[np.isfinite(vectors).all(1)])
    c = normalise(cohort)
    nearest = np.concatenate([(v[i:i + 4096] @ c.T).max(axis=1) for i in range(0, len(v), 4096)] or [np.zeros(0)])
    return v[nearest < same]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 5, 30, 45])
    ap.add_argument("--target-far", type=float, default=1e-3)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--lookalike-share", type=float, default=0.4,
                    help="the third rule: per-source thresholds at target FAR x this share")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--strangers-dir", action="append", default=[], metavar="NAME=DIR",
                    help="one more stranger source: every photo under DIR (central face), less the photos that are "
                         "in the model's cohort (a face within --same-photo of a cohort face); every LFW DevTest and "
                         "CelebA partition-2 person is measured against it")
    ap.add_argument("--same-photo", type=float, default=0.9,
                    help="similarity from which a --strangers-dir face counts as a cohort photo (a cohort prepared "
                         "from other crops of the same photos needs less: UTKFace's chips match its cohort rows at 0.8-0.95)")
    args = ap.parse_args()
    t0 = time.time()
    emb = Embedder.load(args.model)
    cohort, labels = emb.cohort, emb.cohort_sources
    if cohort is None or labels is None:
        print("the model has no labelled cohort (scripts/cohort_sources.py)", file=sys.stderr)
        return 2

    # ---- LFW DevTest
    lfw = args.data / "lfw"
    lfw_paths = lfw_people_images(lfw / "pairsDevTest.txt", lfw / "lfw-deepfunneled")
    lfw_paths = sorted(set(lfw_paths) | {p for d in {q.parent for q in lfw_paths} for p in d.glob("*.jpg")})
    lfw_v = embedded(lfw_paths, emb, args.cache, "lfw_devtest")
    lfw_who = np.array([p.parent.name for p in lfw_paths])
    # ---- CelebA partition 2: celeba (enrolled), celeba_wild, celeba_half
    roots = [args.data / "celeba", args.data / "celeba_wild", args.data / "celeba_half"]
    table = load_celeba([r for r in roots if r.is_dir()]).table
    t2 = table[table["partition"] == 2].sort_values("image").reset_index(drop=True)
    c_paths = [Path(p) for p in t2["path"]]
    c_v = embedded(c_paths, emb, args.cache, "celeba_p2")
    c_who = t2["identity"].to_numpy()
    c_root = np.array([Path(p).parents[1].name for p in t2["path"]])
    male, young = t2["Male"].to_numpy(), t2["Young"].to_numpy()

    tasks = []  # (source, enrolled vectors in order per person, stranger mask function)
    ok = np.isfinite(lfw_v).all(1)
    for who in np.unique(lfw_who):
        mine = np.flatnonzero((lfw_who == who) & ok)
        tasks.append(("LFW DevTest (same domain)", lfw_v[mine], lfw_v[ok & (lfw_who != who)]))
    okc = np.isfinite(c_v).all(1)
    wild = c_root == "celeba_wild"
    for who in np.unique(c_who[wild & okc]):
        mine = np.flatnonzero(wild & okc & (c_who == who))
        tasks.append(("celeba_wild (same domain)", c_v[mine], c_v[wild & okc & (c_who != who)]))
    aligned = c_root == "celeba"
    for who in np.unique(c_who[aligned & okc]):
        mine = np.flatnonzero(aligned & okc & (c_who == who))
        m, y = int(np.round(male[c_who == who].mean())), int(np.round(young[c_who == who].mean()))
        other = okc & (c_who != who)
        tasks.append(("CelebA same sex and age band", c_v[mine], c_v[other & (male == m) & (young == y)]))
        tasks.append(("CelebA any", c_v[mine], c_v[other]))
    for spec in args.strangers_dir:
        name, _, folder = spec.partition("=")
        extra = held_out_of_cohort(embedded(sorted(Path(folder).rglob("*.jpg")), emb, args.cache, f"dir_{name}"), cohort,
                                   args.same_photo)
        print(f"# {name}: {len(extra)} strangers held out of the cohort", file=sys.stderr)
        people = [lfw_v[np.flatnonzero((lfw_who == w) & ok)] for w in np.unique(lfw_who)]
        people += [c_v[np.flatnonzero(aligned & okc & (c_who == w))] for w in np.unique(c_who[aligned & okc])]
        tasks += [(f"{name} (held out of the cohort)", mine, extra) for mine in people]
    print(f"# {len(tasks)} (person, source) tasks; {time.time() - t0:.0f} s", file=sys.stderr)

    res: dict[tuple[str, int, str], list[int]] = {}
    strangers_of: dict[str, int] = {}
    for source, mine, strangers in tasks:
        strangers_of[source] = max(strangers_of.get(source, 0), len(strangers))
        for c in args.counts:
            if len(mine) < c:
                continue
            pooled = normalise(mine[:c])
            s = identity_scores(strangers, pooled, args.top_k)
            genuine = identity_scores(mine[c:], pooled, args.top_k)  # the person's other photos (TAR)
            for rule in RULES:
                kw = RULES[rule]
                if isinstance(kw, str):
                    kw = {"lookalike_share": args.lookalike_share, **({"shift_depth": 10.0} if "shift" in kw else {})}
                cal = calibrate_identity(pooled, cohort, args.target_far, args.top_k,
                                         sources=None if kw is None else labels,
                                         rule=RULE_POOLED if kw is None else RULE_HARDEST_SOURCE,
                                         same_person_similarity=emb.similarity_threshold, **(kw or {}))
                r = res.setdefault((source, c, rule), [0, 0, 0, 0, 0])
                r[0] += int((s >= cal.similarity_threshold).sum())
                r[1] += len(s)
                r[2] += 1
                r[3] += int((genuine >= cal.similarity_threshold).sum())
                r[4] += len(genuine)
    print(f"\nmodel {emb.fingerprint}, target FAR {args.target_far:g}; no augmented views\n")
    print(f"measured / promised FAR (95% CI); TAR; look-alike share {args.lookalike_share:g}\n")
    print("| strangers | enrolled photos | people | decisions | " + " | ".join(RULES) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(RULES))
    rows = []
    for source in dict.fromkeys(t[0] for t in tasks):
        for c in args.counts:
            cells = []
            for rule in RULES:
                if (source, c, rule) not in res:
                    break
                fa, n, people, ta, ng = res[(source, c, rule)]
                lo, hi = wilson(fa, n)
                tar = f"; TAR {ta / ng:.3f}" if ng else ""
                cells.append(f"{fa / n / args.target_far:.2f}x ({lo / args.target_far:.2f}-{hi / args.target_far:.2f}){tar}")
                rows.append({"source": source, "count": c, "rule": rule, "people": people, "decisions": n,
                             "false_accepts": fa, "ratio": fa / n / args.target_far, "genuine": ng, "true_accepts": ta})
            if len(cells) == len(RULES):
                print(f"| {source} | {c} | {people} | {n:,} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"model": emb.fingerprint, "rows": rows}, indent=1))
    print(f"\n{time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
