"""A learned linear transform before `faceverify people`'s grouping (issue 30, third round): WCCN and
shrunk LDA fitted on a network's vectors of labelled faces in neither the selection nor the report
sets (CelebA partition 0, the shipped model's training identities; ORL's 40 people), applied before
the centring, against the centring alone (docs/people.md, "A learned transform for grouping").

    .venv/bin/python bench/bench_group_transform.py --train /tmp/i30f/train-celeba-<fp>-16447.npz \
        [--orl /tmp/i30f/train-orl-<fp>-400.npz] [--network shipped|dlib] [--dlib-model /tmp/dlib.pt]
        [--cache DIR] [--subsets 20]

--train / --orl: scripts/grouping_train_vectors.py's caches of the network's vectors of CelebA
partition 0 / of ORL (run it first; for --network dlib, with --model the dlib file). --cache /
--dlib-model: bench_groups.py's cached faces of the selection and report sets (as
bench_group_tries.py). Every try groups one face per photo with `people`'s other settings (hdbscan,
min_faces 2, the quality gate, no merge), the shipped model's vectors (--network dlib: dlib's imported
network's, trained by dlib on its own face sets, not on these CelebA photos). Prints:

1. Per try, the selection objective (mean of the CelebA partition 1 draws' mean F and LFW DevTrain's F,
   bench_groups' objective) at max_distance 0.9..1.5: distances change in the new space, so the cap is
   re-chosen per try.
2. Per try at its best cap: BCubed F on each selection set and on the report sets (the 3,062 LFW photos,
   LFW DevTest, CelebA partition 2), with the difference to the centring alone (today's default) in the
   same run; the report columns are read only after the choice.
3. The try chosen on selection against the centring on --subsets paired subsets of the selection sets.
4. Separability, LFW DevTrain people: share of genuine pairs accepted at FAR 1e-3 / 1e-4 in the
   model's space, the centred space and the transformed spaces.
5. Why: the spread of one person's faces (mean squared distance to the person's mean vector) and of
   the people's means, on the training identities, ORL and the selection sets; and a cross-fit (a
   diagnostic, not a choice): WCCN fitted on one selection set's people, scored on the other.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_group_tries as bt  # noqa: E402
import bench_groups as bg  # noqa: E402
from common import SHARED_DATA, print_table  # noqa: E402

CAPS = (0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5)
BASE = "centre (prior 200, the new default)"
KEY = "v_shipped"  # the network whose vectors are grouped (--network): bench_groups.py's field
NETWORK = "shipped model"


def fit_transform(vectors: np.ndarray, identity: np.ndarray, *, kind: str = "wccn", shrink: float = 0.5,
                           dim: int | None = None) -> np.ndarray:
    """(D, K) float32 matrix M learned from labelled faces ((N, D) unit vectors of people `identity` (N,)),
    applied as vectors @ M before centring and grouping (transform_space).

    "wccn": within-class covariance normalisation (Hatch et al. 2006): M = Sw^-1/2, Sw the covariance of
    the vectors about their own person's mean, shrunk toward its mean variance, (1-shrink) Sw +
    shrink tr(Sw)/D I; directions in which one person's faces vary (pose, light) are shrunk against
    those in which people differ. K = D.
    "lda": the top `dim` directions of Fisher's LDA with the same shrunk Sw (generalised eigenvectors of
    the between-person covariance, scaled to unit within-person variance); with dim = D it equals
    "wccn" up to a rotation, so only dim < D differs. People with one face add nothing to Sw."""
    x = np.asarray(vectors, np.float64)
    y = np.asarray(identity)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"fit_transform: vectors {x.shape} and identity {y.shape} do not match")
    if not 0 <= shrink <= 1:
        raise ValueError(f"fit_transform: shrink {shrink} is outside [0, 1]")
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    means = np.zeros((len(counts), x.shape[1]))  # (P, D) per-person means
    np.add.at(means, inverse, x)
    means /= counts[:, None]
    within = x - means[inverse]  # (N, D)
    several = counts[inverse] >= 2
    if several.sum() < 2:
        raise ValueError("fit_transform: needs people with 2 or more faces")
    d = x.shape[1]
    sw = within[several].T @ within[several] / max(int(several.sum()) - int((counts >= 2).sum()), 1)  # (D, D)
    sw = (1 - shrink) * sw + shrink * np.trace(sw) / d * np.eye(d)
    if kind == "wccn":
        w, u = np.linalg.eigh(sw)
        return (u @ np.diag(w ** -0.5) @ u.T).astype(np.float32)
    if kind == "lda":
        from scipy.linalg import eigh

        centred_means = means - x.mean(axis=0)
        sb = (centred_means * counts[:, None]).T @ centred_means / len(x)  # (D, D)
        w, v = eigh(sb, sw)  # ascending; v.T sw v = I
        k = d if dim is None else int(dim)
        return np.ascontiguousarray(v[:, ::-1][:, :k]).astype(np.float32)
    raise ValueError(f"fit_transform: unknown kind {kind!r} (wccn or lda)")


def transform_space(vectors: np.ndarray, matrix: np.ndarray | None, mean: np.ndarray | None) -> np.ndarray:
    """(N, K) float32 unit rows of the space `faceverify people` groups in: (vectors - mean) @ matrix
    (a learned transform, fit_transform; None = none), mean = library_mean of the untransformed
    vectors (None = no centring). The transform is linear, so centring before or after it is the same."""
    x = np.asarray(vectors, np.float32)
    if mean is not None:
        x = x - np.asarray(mean, np.float32)[None, :]
    if matrix is not None:
        m = np.asarray(matrix, np.float32)
        if m.ndim != 2 or m.shape[0] != x.shape[1]:
            raise ValueError(f"grouping transform of shape {m.shape} does not fit {x.shape[1]}-d vectors")
        x = x @ m  # (N, K)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def fits(train: Path, orl: Path | None) -> dict[str, np.ndarray]:
    """try name -> (D, K) matrix fitted on the partition-0 vectors (and the ORL people's, named "ORL ...")."""
    t = np.load(train)
    x, y = t["vectors"], t["identity"]
    out = {f"WCCN, shrinkage {a}": fit_transform(x, y, kind="wccn", shrink=a) for a in (0.0, 0.25, 0.5, 0.75, 0.9)}
    for k in (32, 64, 96):
        out[f"LDA {k} dims, shrinkage 0.5"] = fit_transform(x, y, kind="lda", shrink=0.5, dim=k)
    for k in (32, 64):
        out[f"LDA {k} dims, shrinkage 0.1"] = fit_transform(x, y, kind="lda", shrink=0.1, dim=k)
    if "paths" in t:  # the full-size photos only: celeba_half's are downscaled to half (89x109)
        full = np.array([Path(p).parts[-3] != "celeba_half" for p in t["paths"][t["photo"]]])
        out.update({f"WCCN, full-size photos only, shrinkage {a}": fit_transform(x[full], y[full], kind="wccn", shrink=a)
                    for a in (0.5, 0.9)})
    if orl is not None:
        t = np.load(orl)
        out.update({f"ORL WCCN, shrinkage {a}": fit_transform(t["vectors"], t["identity"], kind="wccn", shrink=a)
                    for a in (0.5, 0.75, 0.9)})
    return out


def register(matrices: dict[str, np.ndarray]) -> list[str]:
    """Add each matrix to bench_group_tries.TRIES twice: before the centring and alone."""
    names = []
    for name, m in matrices.items():
        bt.TRIES[f"{name} + centre"] = transform_try(m, centre=True)
        bt.TRIES[f"{name}, no centring"] = transform_try(m, centre=False)
        names += [f"{name} + centre", f"{name}, no centring"]
    return names


def transform_try(matrix: np.ndarray, centre: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A bench_group_tries try: group unit((x - the library's shrunk mean) @ matrix), or unit(x @ matrix)."""
    from index.groups import library_mean

    return lambda x, lib: bt.plain(transform_space(x, matrix, library_mean(lib) if centre else None))


def objective(f: dict[str, float], selection: dict) -> float:
    return (np.mean([f[v] for v in selection if "draw" in v]) + f["LFW DevTrain"]) / 2


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="grouping_train_vectors.py's CelebA partition 0 cache")
    ap.add_argument("--orl", default="", help="grouping_train_vectors.py --source orl's cache (optional)")
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--dlib-model", default="/tmp/dlib.pt")
    ap.add_argument("--cache", default=str(bg.CACHE))
    ap.add_argument("--min-face", type=int, default=40)
    ap.add_argument("--subsets", type=int, default=20)
    ap.add_argument("--network", default="shipped", choices=("shipped", "dlib"),
                    help="whose vectors are grouped; --train / --orl must hold that network's vectors")
    args = ap.parse_args(argv)
    global KEY, NETWORK
    KEY, NETWORK = ("v_dlib", "dlib imported") if args.network == "dlib" else ("v_shipped", "shipped model")
    logging.basicConfig(level=logging.WARNING)
    sets, selection, report = bt.load_sets(args)
    matrices = fits(Path(args.train), Path(args.orl) if args.orl else None)
    names = ["none", BASE, *register(matrices)]
    # 1. the cap per try on the selection sets
    best, rows = {}, []
    for name in names:
        row, scores = [name], {}
        for bt.CAP in CAPS:
            scores[bt.CAP] = objective({v: bt.f_of(sets, selection[v], KEY, name) for v in selection}, selection)
            row.append(f"{scores[bt.CAP]:.4f}")
        best[name] = max(CAPS, key=lambda c: (round(scores[c], 4), -c))  # ties: the smaller cap
        rows.append(row + [best[name]])
    print(f"\n{NETWORK}: the selection objective by max_distance")
    print_table(["try", *(f"{c}" for c in CAPS), "best cap"], rows, right=[False, *[True] * (len(CAPS) + 1)])
    # 2. every set at the try's best cap
    views = {**selection, **report}
    res = {}
    for name in names:
        bt.CAP = best[name]
        res[name] = {v: bt.f_of(sets, views[v], KEY, name) for v in views}
        res[name]["selection"] = objective(res[name], selection)
    cols = ["selection", *[v for v in selection], *report]
    rows = [[name, best[name], *(f"{res[name][c]:.3f}" + ("" if name == BASE else f" ({res[name][c] - res[BASE][c]:+.3f})")
                                 for c in cols)] for name in names]
    print(f"\n{NETWORK}: BCubed F at each try's best cap (difference to '{BASE}')")
    print_table(["try", "cap", *(f"{c} (sel.)" for c in cols[:len(selection) + 1]), *(f"{r} (report)" for r in report)],
                rows, right=[False, *[True] * (len(cols) + 1)])
    chosen = max(names[2:], key=lambda n: res[n]["selection"])
    print(f"\nchosen on selection: {chosen} (cap {best[chosen]}), selection {res[chosen]['selection']:.4f} "
          f"against {res[BASE]['selection']:.4f} for '{BASE}' (cap {best[BASE]})")
    # 3. paired subsets
    lfw_train = selection["LFW DevTrain"][1]
    halves, draws = bt.paired_subsets(sets, selection, args.subsets)
    rows = []
    for label, subsets in (("LFW DevTrain, random halves of the people", halves), ("CelebA p1 draws (seed 2)", draws)):
        fc, fb = [], []
        for v in subsets:
            bt.CAP = best[chosen]
            fc.append(bt.f_of(sets, v, KEY, chosen))
            bt.CAP = best[BASE]
            fb.append(bt.f_of(sets, v, KEY, BASE))
        d = np.array(fc) - np.array(fb)
        rows.append([label, len(d), f"{d.mean():+.4f}", f"{d.std(ddof=1) / np.sqrt(len(d)):.4f}", int((d > 0).sum()),
                     int((d < 0).sum())])
    print(f"\npaired subsets of the selection sets: {chosen} against {BASE}")
    print_table(["subsets", "n", "mean difference in F", "standard error", "better", "worse"], rows,
                right=[False, True, True, True, True, True])
    separability(sets, lfw_train, {k: matrices[k] for k in matrices if k in chosen or k == "WCCN, shrinkage 0.5"})
    spread_and_cross_fit(args, sets, selection)


def separability(sets: dict, photos: np.ndarray, matrices: dict[str, np.ndarray]) -> None:
    """4. Genuine pairs accepted at fixed false accept rates and nearest-face accuracy per space."""
    from index.groups import library_mean
    from index.quality import DEFAULT_MIN_QUALITY

    s = sets["lfw"]
    vecs, idx = bg.per_photo(s["faces"], KEY, len(s["paths"]))
    q = np.where(idx >= 0, s["quality"][np.maximum(idx, 0)], np.nan)
    keep = photos[np.isfinite(vecs[photos, 0]) & ~(q[photos] < DEFAULT_MIN_QUALITY)]
    x0, y = vecs[keep], s["y"][keep]
    mean = library_mean(x0)
    spaces = {"the model's": x0, "centred": transform_space(x0, None, mean)}
    for name, m in matrices.items():
        spaces[f"{name} + centre"] = transform_space(x0, m, mean)
    rows = []
    for name, x in spaces.items():
        has_mate, nn_right, tar = bt.separation(x.astype(np.float64), y)
        rows.append([name, f"{nn_right[has_mate].mean():.3f}", f"{tar[0]:.3f}", f"{tar[1]:.3f}"])
    print(f"\nLFW DevTrain people, {NETWORK}, one face per photo: separability per space")
    print_table(["space", "nearest other face is that person", "genuine accepted at FAR 1e-3", "at FAR 1e-4"], rows,
                right=[False, True, True, True])


def spreads(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int, np.ndarray]:
    """(mean squared distance of a face to its person's mean, of the people's means to the overall
    mean, people, (D, D) within-person covariance), over people with 2 or more faces."""
    ids, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    keep = counts[inverse] >= 2
    x, inverse = x[keep].astype(np.float64), inverse[keep]
    means = np.zeros((len(ids), x.shape[1]))
    np.add.at(means, inverse, x)
    means /= np.maximum(counts, 1)[:, None]
    dev = x - means[inverse]  # (N, D)
    within = float((dev ** 2).sum(axis=1).mean())
    used = np.unique(inverse)
    between = float(((means[used] - x.mean(axis=0)) ** 2).sum(axis=1).mean())
    return within, between, len(used), dev.T @ dev / len(dev)


def top_share(cov: np.ndarray, basis_cov: np.ndarray, k: int = 10) -> float:
    """Share of cov's trace in the top k principal directions of basis_cov."""
    _, u = np.linalg.eigh(basis_cov)
    top = u[:, -k:]  # (D, k)
    return float(np.trace(top.T @ cov @ top) / np.trace(cov))


def spread_and_cross_fit(args: argparse.Namespace, sets: dict, selection: dict) -> None:
    """5. Spreads per set, and WCCN fitted across the two selection sets."""
    from index.quality import DEFAULT_MIN_QUALITY

    def faces_of(view: tuple[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        s = sets[view[0]]
        vecs, idx = bg.per_photo(s["faces"], KEY, len(s["paths"]))
        q = np.where(idx >= 0, s["quality"][np.maximum(idx, 0)], np.nan)
        keep = view[1][np.isfinite(vecs[view[1], 0]) & ~(q[view[1]] < DEFAULT_MIN_QUALITY)]
        return vecs[keep], s["y"][keep]

    named = {"CelebA partition 0 (the shipped model's training identities)": np.load(args.train)}
    if args.orl:
        named["ORL"] = np.load(args.orl)
    got = {name: spreads(t["vectors"], t["identity"]) for name, t in named.items()}
    got.update({f"{name} (selection)": spreads(*faces_of(selection[name])) for name in ("CelebA p1, all photos", "LFW DevTrain")})
    lfw_cov = got["LFW DevTrain (selection)"][3]
    rows = [[name, n, f"{w:.3f}", f"{b:.3f}", f"{b / w:.2f}", f"{top_share(cov, cov):.3f}", f"{top_share(lfw_cov, cov):.3f}"]
            for name, (w, b, n, cov) in got.items()]
    print(f"\n{NETWORK}: spread of one person's faces and of the people (people with 2 or more faces); the share of the "
          "within-person variance in its top 10 of 128 directions (0.078 if even), and the share of LFW DevTrain's in this set's top 10")
    print_table(["set", "people", "face to its person's mean (mean squared distance)", "person's mean to the overall mean",
                 "ratio", "own top-10 share", "LFW DevTrain's share in these 10"], rows, right=[False, *[True] * 6])
    rows = []
    pairs = (("CelebA p1, all photos", "LFW DevTrain", ["LFW DevTrain"]),
             ("LFW DevTrain", "CelebA p1 draws", [v for v in selection if "draw" in v]))
    bt.CAP = 1.2
    for fit_on, scored, views in pairs:
        x, y = faces_of(selection[fit_on])
        base = np.mean([bt.f_of(sets, selection[v], KEY, BASE) for v in views])
        for a in (0.5, 0.75, 0.9):
            bt.TRIES["cross"] = transform_try(fit_transform(x, y, kind="wccn", shrink=a), centre=True)
            f = np.mean([bt.f_of(sets, selection[v], KEY, "cross") for v in views])
            rows.append([fit_on, scored, a, f"{base:.3f}", f"{f:.3f} ({f - base:+.3f})"])
    print("\ncross-fit on the selection sets (diagnostic): WCCN + centre fitted on one set's people, BCubed F on the other, cap 1.2")
    print_table(["fitted on", "scored on", "shrinkage", "centre alone", "WCCN + centre"], rows,
                right=[False, False, True, True, True])


if __name__ == "__main__":
    main()
