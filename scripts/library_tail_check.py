"""Is the library's tail a reliable calibrator? (issue 28, item 2), measured on real scores.

For each enrolled person (LFW DevTest people with >= 5 photos: 3 enrolled; CelebA partition-2 people of
../shared/data/celeba with >= 20 photos: 5 enrolled; no augmented views, as scripts/far_same_domain.py),
a library is built from strangers' faces and the person's own:
- strangers: the central faces of the 4,992 LFW photos (news photos, the issue's domain), the person's own
  photos left out, split at random into a library half and a test half; or, as a control whose shift
  should be ~0, half of the model's own impostor cohort (the other half calibrates);
- the person's own faces: their held-out photos' scores, drawn with replacement so that they make up
  0.5%, 1%, 5% or 10% of the library.
`verify.identity.library_tail.fit_library_tail` then estimates the library's threshold. Printed per
library kind and own share: measured / promised FAR on the test half and TAR on the held-out photos for
the cohort's threshold (hardest source), the library's estimate, and max(both) where the estimate is
reliable (what `--library-threshold act` would use), plus how often the estimate was reliable and stricter.

    PYTHONPATH=. .venv/bin/python scripts/library_tail_check.py --cache /tmp/p28/fsd [--draws 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from far_same_domain import embedded  # noqa: E402

from verify.data.celeba import load_celeba  # noqa: E402
from verify.evaluation.evaluate import lfw_people_images  # noqa: E402
from verify.identity.library_tail import FIT_DEPTH, StrangerCurve, fit_library_tail  # noqa: E402
from verify.identity.scoring import calibrate_identity, cohort_scores, identity_scores, normalise, threshold_at_far  # noqa: E402
from verify.model.cohort import CohortSources  # noqa: E402
from verify.model.file import Embedder  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARES = (0.005, 0.01, 0.05, 0.1)
RULES = ("cohort (hardest source)", "library estimate", "max of both when reliable")


def people(args: argparse.Namespace, emb: Embedder) -> list[tuple[str, np.ndarray, str]]:
    """(kind, the person's vectors in photo order, LFW folder name or '') per enrolled person: the report
    people (LFW DevTest, CelebA partition 2) or, with --select, the selection people (CelebA partition 1)."""
    out = []
    roots = [r for r in (args.data / "celeba", args.data / "celeba_wild", args.data / "celeba_half") if r.is_dir()]
    table = load_celeba(roots).table
    part = 1 if args.select else 2
    t = table[(table["partition"] == part) & table["path"].map(lambda q: Path(q).parents[1].name == "celeba")]
    t = t.sort_values("image").reset_index(drop=True)
    cv = embedded([Path(q) for q in t["path"]], emb, args.cache, f"celeba_aligned_p{part}")
    ok, cwho = np.isfinite(cv).all(1), t["identity"].to_numpy()
    for w in np.unique(cwho[ok]):
        mine = cv[ok & (cwho == w)]
        if len(mine) >= 20:
            out.append((f"CelebA p{part}", mine, ""))
    if args.select:
        return out
    lfw = args.data / "lfw"
    paths = lfw_people_images(lfw / "pairsDevTest.txt", lfw / "lfw-deepfunneled")
    paths = sorted(set(paths) | {q for d in {q.parent for q in paths} for q in d.glob("*.jpg")})
    v = embedded(paths, emb, args.cache, "lfw_devtest")
    who = np.array([q.parent.name for q in paths])
    ok = np.isfinite(v).all(1)
    for w in np.unique(who):
        mine = v[ok & (who == w)]
        if len(mine) >= 5:
            out.append(("LFW DevTest", mine, str(w)))
    return out


LIBRARIES = ("LFW news photos", "LFW news photos, cohort without its LFW source", "cohort half (control)")


def library_case(library_kind: str, pooled: np.ndarray, cohort: np.ndarray, labels: CohortSources, emb: Embedder,
                 args: argparse.Namespace, rng: np.random.Generator, lfw_faces: np.ndarray):
    """(the strangers' scores, the cohort calibration, the cohort strangers' scores) of one library kind."""
    same = emb.similarity_threshold
    if library_kind == "cohort half (control)":  # calibrate on one half of the cohort, the library is the other
        use = rng.random(len(cohort)) < 0.5
    elif library_kind.endswith("without its LFW source"):  # the library's domain unknown to the cohort
        use = labels.codes != labels.names.index("lfw")
    else:
        use = np.ones(len(cohort), bool)
    sub = CohortSources(labels.codes[use], labels.names, labels.persons[use])
    cal = calibrate_identity(pooled, cohort[use], args.target_far, args.top_k, sources=sub, same_person_similarity=same)
    cs, keep = cohort_scores(pooled, cohort, args.top_k, sources=labels, same_person_similarity=same)
    strangers = cs[~use & keep] if library_kind == "cohort half (control)" else identity_scores(lfw_faces, pooled, args.top_k)
    return strangers, cal, cs[use & keep]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--target-far", type=float, default=1e-3)
    ap.add_argument("--draws", type=int, default=3, help="random library / test splits per person")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--select", action="store_true", help="the selection people (CelebA partition 1)")
    ap.add_argument("--depth", type=float, default=FIT_DEPTH, help="fit_library_tail's depth")
    ap.add_argument("--own-jitter", type=float, default=0.05, help="sd of the noise added to the drawn own scores")
    args = ap.parse_args()
    t0 = time.time()
    emb = Embedder.load(args.model)
    cohort, labels = emb.cohort, emb.cohort_sources
    lfw_paths = sorted((args.data / "lfw" / "lfw-deepfunneled").rglob("*.jpg"))
    lfw_v = embedded(lfw_paths, emb, args.cache, "lfw_all")
    lfw_ok = np.isfinite(lfw_v).all(1)
    lfw_who = np.array([p.parent.name for p in lfw_paths])
    persons = people(args, emb)
    print(f"# {len(persons)} people, {lfw_ok.sum()} LFW faces, cohort {len(cohort)}; {time.time() - t0:.0f} s", file=sys.stderr)
    rng = np.random.default_rng(0)
    res: dict[tuple, list[float]] = {}
    err: dict[tuple, list[tuple[float, float]]] = {}  # threshold - the strangers' own threshold: (cohort, library)
    for kind, mine, folder in persons:
        n_enrol = 3 if kind == "LFW DevTest" else 5
        pooled = normalise(mine[:n_enrol])
        genuine = identity_scores(mine[n_enrol:], pooled, args.top_k)
        for library_kind in LIBRARIES:
            for d in range(args.draws):
                strangers, cal, coh_scores = library_case(library_kind, pooled, cohort, labels, emb, args, rng,
                                                          lfw_v[lfw_ok & (lfw_who != folder)])
                curve = StrangerCurve.from_scores(coh_scores)  # what a calibration stores
                perm = rng.permutation(len(strangers))
                lib_s, test_s = strangers[perm[: len(perm) // 2]], strangers[perm[len(perm) // 2:]]
                for share in SHARES:
                    k = int(round(share * len(lib_s) / (1 - share)))
                    # a smoothed bootstrap of the held-out photos' scores (LFW people have 2-4 of them)
                    own = rng.choice(genuine, size=k, replace=True) + rng.normal(0, args.own_jitter, k)
                    fit = fit_library_tail(np.concatenate([lib_s, own]), curve, args.target_far, depth=args.depth)
                    thr = {RULES[0]: cal.similarity_threshold, RULES[1]: fit.similarity_threshold,
                           RULES[2]: max(cal.similarity_threshold, fit.similarity_threshold) if fit.reliable
                           else cal.similarity_threshold}
                    oracle = threshold_at_far(np.sort(strangers)[::-1], args.target_far)
                    err.setdefault((library_kind, kind, share), []).append(
                        (cal.similarity_threshold - oracle, fit.similarity_threshold - oracle))
                    for rule, t in thr.items():
                        r = res.setdefault((library_kind, kind, share, rule), [0, 0, 0, 0, 0, 0, 0.0])
                        r[0] += int((test_s >= t).sum())
                        r[1] += len(test_s)
                        r[2] += int((genuine >= t).sum())
                        r[3] += len(genuine)
                        r[4] += int(fit.reliable)
                        r[5] += int(fit.reliable and fit.similarity_threshold > cal.similarity_threshold)
                        r[6] += fit.shift
        print(f"# {kind} {folder} done {time.time() - t0:.0f} s", file=sys.stderr)
    print(f"\nmodel {emb.fingerprint}, target FAR {args.target_far:g}, {args.draws} splits per person\n")
    print("| library | people | own share | fits reliable | reliable and stricter | mean shift | "
          + " | ".join(f"{r}: FAR / promise, TAR" for r in RULES) + " | threshold error, cohort | threshold error, library |")
    print("|---|---|---:|---:|---:|---:|" + "---:|" * (len(RULES) + 2))
    for (library_kind, kind, share, rule), r in sorted(res.items()):
        if rule != RULES[0]:
            continue
        cells = []
        for rr in RULES:
            fa, n, ta, ng, rel, stricter, shift = res[(library_kind, kind, share, rr)]
            cells.append(f"{fa / n / args.target_far:.2f}x, {ta / ng:.3f}")
        n_fits = len([p for p in persons if p[0] == kind]) * args.draws
        e = np.array(err[(library_kind, kind, share)])  # (fits, 2)
        cells += [f"{np.median(np.abs(e[:, j])):.3f} ({np.percentile(e[:, j], 10):+.3f}..{np.percentile(e[:, j], 90):+.3f})"
                  for j in (0, 1)]
        print(f"| {library_kind} | {kind} | {share:.1%} | {r[4]}/{n_fits} | {r[5]}/{n_fits} | {r[6] / n_fits:+.3f} | "
              + " | ".join(cells) + " |")
    print(f"\n{time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
