"""The real job, per decision rule: enroll three LFW people from a few photos each, scan every LFW photo
of ../shared/data, and count what each person's threshold finds and lets through.

    .venv/bin/python scripts/real_job.py [--split DevTest] [--people 3] [--photos 3] [--cache /tmp/real_job]

Enrollment is `faceverify enroll`'s (verify.identity.embed.embed_enrollment: the photo's largest face
+ 8 augmented views), the scan is `faceverify scan`'s (every face of every photo, FacePipeline defaults
as the CLI's: min face 20 px, probability 0.9), and the scores are the product's (pooled photos, top-3
mean: verify.identity.scoring). Each person is decided on their own, as `find NAME` does. The three
people are the `--split` people (pairsDevTest: not in the cohort, whose LFW people are pairsDevTrain's)
with the most photos; their enrolled photos are their first `--photos` (by file name), left out of
"found". Rules, side by side on the same faces:

- pooled: today's until issue 28: the threshold at the target FAR on the whole cohort;
- hardest-source: the highest of the per-source thresholds (own faces and near-duplicates out);
- look-alike 0.4: the same with each source's threshold at the target FAR x 0.4 (a promise for the
  strangers of the person's sex and age band, assumed 40% of each source);
- library check, stricter: hardest-source, or the library's estimate where it is reliable and stricter
  (`find --library-threshold stricter`; the library is the scanned faces); library estimate alone: that
  estimate whatever it says (verify.identity.library_tail);
- as-norm: adaptive symmetric score normalisation (top-K cohort statistics of the enrollment and of the
  probe, K = 200) on one half of the cohort, threshold at the target FAR of the other half's normalised
  scores.

Reported per person: photos found (of their photos not enrolled, a face accepted), files falsely matched
(photos of other people with any face accepted), and the strangers' labelled faces (the face at the
centre of an LFW photo of another person) accepted, against the promise: overall, and for strangers
whose people are not in the cohort (the `--split` people) and those who are (pairsDevTrain's).
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

from verify.identity.library_tail import StrangerCurve, fit_library_tail  # noqa: E402
from verify.queries.library_check import STRICTER_BY  # noqa: E402

from verify.data.pairs import read_lfw_pairs  # noqa: E402
from verify.identity.embed import embed_enrollment  # noqa: E402
from verify.identity.enroll import face_pipeline  # noqa: E402
from verify.identity.scoring import RULE_HARDEST_SOURCE, RULE_POOLED, calibrate_identity, identity_scores, normalise, pool_photos  # noqa: E402
from verify.model.runtimes import load_embedder  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def scan_faces(paths: list[Path], pipeline, cache: Path | None) -> dict[str, np.ndarray]:
    """Every face of every photo: vectors (F, D), photo index (F,), labelled (F,) = the face at the
    centre of an LFW crop (the named person; others are bystanders)."""
    if cache is not None and cache.is_file():
        z = np.load(cache)
        if list(z["paths"]) == [str(p) for p in paths]:
            return {k: z[k] for k in z.files}
    vecs, photo, labelled = [], [], []
    for i, res in enumerate(pipeline.iter_process([str(p) for p in paths])):
        if not (res.ok and res.faces):
            continue
        centres = [((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2) for f, _ in res.faces]
        off = [abs(cx - 125) + abs(cy - 125) for cx, cy in centres]
        central = int(np.argmin(off)) if min(off) < 80 else -1
        for k in range(len(res.faces)):
            vecs.append(res.embeddings[k])
            photo.append(i)
            labelled.append(k == central)
    out = {"vectors": np.stack(vecs).astype(np.float32), "photo": np.array(photo), "labelled": np.array(labelled),
           "paths": np.array([str(p) for p in paths])}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **out)
    return out


def as_norm_rule(pooled: np.ndarray, cohort: np.ndarray, probes: np.ndarray, target_far: float, top_k: int,
                 k_norm: int = 200, seed: int = 0) -> np.ndarray:
    """(P,) accept decisions by AS-norm: half the cohort normalises, the other half calibrates."""
    gen = np.random.default_rng(seed)
    order = gen.permutation(len(cohort))
    norm_half, cal_half = cohort[order[: len(order) // 2]], cohort[order[len(order) // 2 :]]

    def top_stats(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (N, M) -> mean, std of top-K per row
        top = -np.partition(-sims, k_norm - 1, axis=1)[:, :k_norm]
        return top.mean(1), top.std(1) + 1e-6

    e_mu, e_sd = top_stats(identity_scores(norm_half, pooled, top_k)[None])  # enrollment side: (1,)

    def normalised(x: np.ndarray) -> np.ndarray:
        s = identity_scores(x, pooled, top_k)
        out = np.empty(len(x))
        for a in range(0, len(x), 2048):
            p_mu, p_sd = top_stats(normalise(x[a : a + 2048]) @ norm_half.T)
            out[a : a + 2048] = 0.5 * ((s[a : a + 2048] - e_mu) / e_sd + (s[a : a + 2048] - p_mu) / p_sd)
        return out

    cal = np.sort(normalised(cal_half))[::-1]
    allowed = int(np.floor(target_far * len(cal)))
    thr = np.nextafter(cal[allowed], np.inf)
    return normalised(probes) >= thr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=DATA / "lfw")
    ap.add_argument("--split", default="DevTest", choices=("DevTest", "DevTrain"))
    ap.add_argument("--people", type=int, default=3)
    ap.add_argument("--photos", type=int, default=3)
    ap.add_argument("--target-far", type=float, default=1e-3)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=None, help="folder for the scan's vectors (reused when present)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.time()

    emb = load_embedder(None, device="cpu")
    cohort, labels = emb.cohort, emb.cohort_sources
    if cohort is None or labels is None:
        print("the model has no labelled cohort (verify/model/cohort.py)", file=sys.stderr)
        return 2
    root = args.lfw / "lfw-deepfunneled"
    paths = sorted(root.rglob("*.jpg"))
    person_of = np.array([p.parent.name for p in paths])
    split_people = {s: set(read_lfw_pairs(args.lfw / f"pairs{s}.txt")[["name1", "name2"]].to_numpy().ravel())
                    for s in ("DevTrain", "DevTest")}
    pipeline = face_pipeline(emb)
    scan = scan_faces(paths, pipeline, args.cache / "lfw_scan.npz" if args.cache else None)
    vec, photo, labelled = scan["vectors"], scan["photo"], scan["labelled"]
    face_person = person_of[photo]
    print(f"# scan: {len(paths)} photos, {len(vec)} faces ({int(labelled.sum())} labelled); {time.time() - t0:.0f} s",
          file=sys.stderr)

    names, counts = np.unique(person_of, return_counts=True)
    mine = [(c, n) for n, c in zip(names, counts) if n in split_people[args.split]]
    chosen = [n for c, n in sorted(mine, key=lambda t: (-t[0], t[1]))[: args.people]]
    rules = ("pooled", "hardest-source", "look-alike 0.4", "as-norm", "library check, stricter", "library estimate alone")
    rows = []
    for name in chosen:
        own = [p for p in paths if p.parent.name == name]
        enrolled = own[: args.photos]
        batch = embed_enrollment(enrolled, pipeline, n_views=8)
        vecs = np.concatenate([ph.vectors for ph in batch.photos])
        keys = np.repeat([ph.sha256 for ph in batch.photos], [len(ph.vectors) for ph in batch.photos])
        _, pooled = pool_photos(vecs, keys)
        scores = identity_scores(vec, pooled, args.top_k)  # (F,)
        enrolled_idx = {paths.index(p) for p in enrolled}
        not_enrolled = np.array([i not in enrolled_idx for i in photo])
        is_own = face_person == name
        stranger = labelled & ~is_own
        groups = {"all strangers": stranger,
                  f"not in the cohort ({args.split if args.split == 'DevTest' else 'DevTest'})":
                      stranger & np.isin(face_person, list(split_people["DevTest"])),
                  "in the cohort (DevTrain)": stranger & np.isin(face_person, list(split_people["DevTrain"]))}
        for rule in rules:
            if rule == "as-norm":
                accept = as_norm_rule(pooled, cohort, vec, args.target_far, args.top_k)
                thr, src = float("nan"), "as-norm"
            elif rule.startswith("library"):  # the scanned faces are the library (find --library-threshold)
                cal = calibrate_identity(pooled, cohort, args.target_far, args.top_k, sources=labels,
                                         same_person_similarity=emb.similarity_threshold)
                fit = fit_library_tail(scores, StrangerCurve.stored(cal.curve), args.target_far)
                thr, src = cal.similarity_threshold, cal.threshold_source
                if rule.endswith("alone") or (fit.reliable and fit.similarity_threshold > thr + STRICTER_BY):
                    thr, src = fit.similarity_threshold, f"library (shift {fit.shift:+.3f}, own {fit.own_share:.2%})"
                accept = scores >= thr
            else:
                per_source = rule != "pooled"
                cal = calibrate_identity(pooled, cohort, args.target_far, args.top_k,
                                         sources=labels if per_source else None,
                                         rule=RULE_HARDEST_SOURCE if per_source else RULE_POOLED,
                                         same_person_similarity=emb.similarity_threshold,
                                         lookalike_share=0.4 if rule.startswith("look-alike") else 1.0)
                accept = scores >= cal.similarity_threshold
                thr, src = cal.similarity_threshold, cal.threshold_source
            own_photos = {int(i) for i in np.unique(photo[is_own & not_enrolled])}
            found = {int(i) for i in np.unique(photo[accept & is_own & not_enrolled & labelled])}
            n_own = sum(1 for i in range(len(paths)) if person_of[i] == name and i not in enrolled_idx)
            false_files = len(np.unique(photo[accept & (face_person != name)]))
            row = {"person": name, "enrolled": len(batch.photos), "rule": rule, "threshold": thr, "threshold_source": src,
                   "found": len(found), "own_photos": n_own, "own_with_face": len(own_photos), "false_files": int(false_files)}
            for g, mask in groups.items():
                fa, n = int((accept & mask).sum()), int(mask.sum())
                row[g] = {"false_accepts": fa, "faces": n, "far": fa / max(n, 1), "ci95": wilson(fa, n),
                          "ratio": fa / max(n, 1) / args.target_far}
            rows.append(row)
        print(f"# {name}: enrolled {len(batch.photos)}; {time.time() - t0:.0f} s", file=sys.stderr)

    group_names = [g for g in rows[0] if isinstance(rows[0][g], dict)]
    print(f"\nmodel {emb.fingerprint}, target FAR {args.target_far:g}, {len(paths)} LFW photos, {len(vec)} faces; "
          f"people: the {args.people} {args.split} people with most photos, {args.photos} photos enrolled each\n")
    print("| person | rule | threshold (set by) | photos found | files falsely matched | "
          + " | ".join(f"labelled-face FAR x promise, {g}" for g in group_names) + " |")
    print("|---|---|---|---:|---:|" + "---:|" * len(group_names))
    for r in rows:
        thr = "AS-norm" if r["rule"] == "as-norm" else f"{r['threshold']:.4f} ({r['threshold_source']})"
        cells = " | ".join(f"{r[g]['ratio']:.2f}x ({r[g]['false_accepts']}/{r[g]['faces']})" for g in group_names)
        print(f"| {r['person']} | {r['rule']} | {thr} | {r['found']}/{r['own_photos']} "
              f"({100 * r['found'] / max(r['own_photos'], 1):.1f}%) | {r['false_files']} | {cells} |")
    print("\nall three people together (labelled strangers' faces):\n")
    print("| rule | " + " | ".join(group_names) + " |")
    print("|---|" + "---:|" * len(group_names))
    for rule in rules:
        cells = []
        for g in group_names:
            fa = sum(r[g]["false_accepts"] for r in rows if r["rule"] == rule)
            n = sum(r[g]["faces"] for r in rows if r["rule"] == rule)
            lo, hi = wilson(fa, n)
            cells.append(f"{fa / n / args.target_far:.2f}x ({fa}/{n}; 95% CI {lo / args.target_far:.2f}-{hi / args.target_far:.2f}x)")
        print(f"| {rule} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"model": emb.fingerprint, "rows": rows, "target_far": args.target_far,
                                         "seconds": round(time.time() - t0, 1)}, indent=1, default=float))
    print(f"\n{time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
