"""Fairness of `faceverify people`'s grouping across race groups, on UTKFace and SCUT-FBP5500.

    .venv/bin/python bench/bench_group_fairness.py --utk DIR --scut DIR [--per-group 400]
                     [--dlib-model /tmp/dlib.pt] [--cache DIR] [--refresh] [--seeds 0,1,2]
                     [--with-lfw [--lfw-cache DIR]]

These sets label race (UTKFace: `age_gender_race_date.jpg`, race 0-3 = White / Black / Asian /
Indian; SCUT-FBP5500: AF / AM / CF / CM = Asian or Caucasian, female or male) but not identity, so
BCubed recall is undefined. Nearly every photo is a different person, though, so a precision-side
measure is: the share of faces that `people`'s grouping puts into a group with anyone. One library is
made of a balanced mix (--per-group photos drawn, seeded, from each of the 8 groups: UTKFace races 0-3
and SCUT's AF / AM / CF / CM), grouped once per model, and read per group. Both models see the same
MTCNN detections (bench_groups.photo_faces: the shipped model's pipeline, dlib's network imported
into faceverify embedding the same faces aligned to its own geometry); one face per photo (the
largest), as bench_groups does; the library's mean for centring is taken over every face found.

Grouping: `people`'s defaults (index.groups.DEFAULT_*, index.quality.DEFAULT_MIN_QUALITY, centred,
min_faces 3 as `faceverify people --min-faces`), and min_faces 2 beside it (bench_groups' setting).

Printed per group, the two models side by side:
- faces found (photos with a face) and faces the quality gate leaves out (model-independent);
- share grouped with anyone (of the faces found; a face left out by the gate is not grouped), at
  min_faces 3 and 2;
- mean group purity of the grouped faces: the share of each one's group-mates from its own group
  (race and set: UTKFace Asian and SCUT Asian are different groups here);
- share of the grouped faces whose group mixes sexes (the file names' labels: such a group holds at
  least two different people for certain, a lower bound on wrong grouping);
- the mean similarity of each face to its nearest other face in the library (the models' own
  unit vectors, not centred): how crowded each group's faces are for the model.

--with-lfw groups the same strangers again in a library with the 3,062 LFW photos of the people
with >= 2 photos (bench_groups.py's cached faces): people who do repeat, as in a real library, so that
the grouping has real groups to form and a stranger can be wrongly put with strangers or with a real
person. --seeds draws the library several times: full tables for the first draw, then per group the
mean [min, max] over the draws (one draw's figures depend on whether HDBSCAN forms one big group).

Then the same per group for the photos off the shipped model's training side alone (grouped in the same
library): the shipped model was distilled from dlib's network on 45% of the prepared UTKFace and
SCUT-FBP5500 faces, and 45% more are its impostor cohort (docs/data.md); the split is a hash of the
file's path in its repository (training_side), so it is redone here. Grouping reads no cohort.

A group can hold the same person twice (the sets may hold some people more than once), so
"grouped" is an upper bound on wrong grouping and "mixed sexes" a lower one.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_groups import (
    CACHE,
    FACE_FIELDS,
    after_settings,
    face_signals_of,
    group_photos,
    per_photo,
    photo_faces,
)
from common import SHARED_DATA, print_table, ratio

log = logging.getLogger("bench_group_fairness")

UTK_RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian"}
SCUT_GROUPS = {"AF": "Asian F", "AM": "Asian M", "CF": "Caucasian F", "CM": "Caucasian M"}
MODELS = (("v_shipped", "shipped"), ("v_dlib", "dlib imported"))
# Each photo's path inside its repository, as scripts/prepare_extra_data.sh extracted it: what decides
# the shipped model's data split (training_side)
UTK_REL, SCUT_REL = "dataset/UTKFace", "data/landing/Images"


def training_side(rel: str) -> bool:
    """Whether the photo at `rel` fell on the training side of the shipped model's data split
    (scripts/prepare_faces.out_name, then scripts/filter_faces.name_fraction >= 0.45 + 0.10: neither
    cohort nor strangers; the LFW and duplicate filters removed some of those before training, which
    this cannot redo without the prepared folders)."""
    import hashlib

    out_name = hashlib.sha1(rel.encode()).hexdigest()[:16] + ".jpg"
    return int(hashlib.sha1(out_name.encode()).hexdigest()[:8], 16) / 2**32 >= 0.55


def utk_groups(root: Path) -> dict[str, list[tuple[Path, str, str]]]:
    """UTKFace's photos by race 0-3: group name -> [(photo, sex 'F'/'M', path in the repository)]; names
    that do not parse (a few files lack a field) are skipped."""
    out: dict[str, list[tuple[Path, str, str]]] = {f"UTKFace {n}": [] for n in UTK_RACES.values()}
    for p in sorted(root.glob("*.jpg")):
        fields = p.name.split("_")
        try:
            gender, race = int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            continue
        if race in UTK_RACES and gender in (0, 1):
            out[f"UTKFace {UTK_RACES[race]}"].append((p, "M" if gender == 0 else "F", f"{UTK_REL}/{p.name}"))  # UTKFace: 0 male, 1 female
    return out


def scut_groups(root: Path) -> dict[str, list[tuple[Path, str, str]]]:
    """SCUT-FBP5500's photos by file prefix: group name -> [(photo, sex, path in the repository)]."""
    out: dict[str, list[tuple[Path, str, str]]] = {}
    for prefix, name in SCUT_GROUPS.items():
        out[f"SCUT {name}"] = [(p, prefix[1], f"{SCUT_REL}/{p.name}") for p in sorted(root.glob(f"{prefix}*.jpg"))]
    return out


def draw(groups: dict[str, list[tuple[Path, str, str]]], per_group: int, seed: int
         ) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(photos, (N,) group index, (N,) sex, (N,) bool on the shipped model's training side, group
    names): per_group photos of each group, seeded."""
    rng = np.random.default_rng(seed)
    paths, gid, sex, trained, names = [], [], [], [], []
    for name, items in groups.items():
        if len(items) < per_group:
            raise SystemExit(f"{name}: only {len(items)} photos, --per-group {per_group}")
        for j in np.sort(rng.choice(len(items), per_group, replace=False)):
            paths.append(items[j][0])
            sex.append(items[j][1])
            trained.append(training_side(items[j][2]))
            gid.append(len(names))
        names.append(name)
    return paths, np.asarray(gid, np.int64), np.asarray(sex), np.asarray(trained), names


def nearest_other_similarity(vectors: np.ndarray) -> np.ndarray:
    """(N,) cosine similarity of each row to its nearest other row."""
    import faiss

    x = np.ascontiguousarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), np.float32)  # (N, D)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, 2)  # (N, 2): usually itself first
    return np.where(ids[:, 0] == np.arange(len(x)), sims[:, 1], sims[:, 0])


def group_stats(labels: np.ndarray, gid: np.ndarray, sex: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per photo: (share of its group-mates from its own group, NaN when ungrouped; its group mixes sexes)."""
    purity = np.full(len(labels), np.nan)
    mixed = np.zeros(len(labels), bool)
    for g in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == g)
        same = (gid[members][:, None] == gid[members][None, :]).sum(axis=1) - 1  # minus itself
        purity[members] = same / (len(members) - 1)
        known = sex[members][sex[members] != "?"]  # LFW's faces carry no sex label
        mixed[members] = len(np.unique(known)) > 1
    return purity, mixed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--utk", required=True, help="UTKFace's folder of age_gender_race_date.jpg.chip.jpg files")
    ap.add_argument("--scut", required=True, help="SCUT-FBP5500's Images folder (AF*.jpg, AM*, CF*, CM*)")
    ap.add_argument("--per-group", type=int, default=400, help="photos drawn from each of the 8 groups")
    ap.add_argument("--seeds", default="0", help="the draws: full tables for the first, a summary over all")
    ap.add_argument("--dlib-model", default="/tmp/dlib.pt", help="faceverify model import-dlib --out FILE --no-calibrate")
    ap.add_argument("--min-face", type=int, default=40)
    ap.add_argument("--cache", default="/tmp/faceverify-bench-fairness")
    ap.add_argument("--refresh", action="store_true", help="recompute the cached faces")
    ap.add_argument("--with-lfw", action="store_true",
                    help="then again with the LFW photos of the people with >= 2 photos in the library")
    ap.add_argument("--data", default=str(SHARED_DATA), help="for --with-lfw: the shared data (lfw/lfw-deepfunneled)")
    ap.add_argument("--lfw-cache", default=str(CACHE), help="for --with-lfw: bench_groups.py's cache of the LFW faces")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("index.groups").setLevel(logging.WARNING)

    groups = {**utk_groups(Path(args.utk)), **scut_groups(Path(args.scut))}
    after = after_settings()
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    lfw_faces = None
    if args.with_lfw:
        from bench_groups import lfw_photos

        lfw, _, _ = lfw_photos(Path(args.data) / "lfw" / "lfw-deepfunneled")
        lfw_faces = photo_faces(lfw, Path(args.dlib_model), args.min_face, Path(args.lfw_cache), args.refresh, "lfw")
    per_seed: dict[str, list] = {"A": [], "B": []}  # library -> [(names, gid, res)] one per seed
    for k, seed in enumerate(seeds):
        paths, gid, sex, trained, names = draw(groups, args.per_group, seed)
        faces = photo_faces(paths, Path(args.dlib_model), args.min_face, Path(args.cache), args.refresh,
                            f"fairness{args.per_group}")
        title = f"library: {len(paths)} photos, {args.per_group} drawn (seed {seed}) from each of {len(names)} groups"
        res = group_library(faces, len(paths), gid, sex, after)
        per_seed["A"].append((names, gid, res))
        if k == 0:
            print("A: the strangers alone")
            report(args, title, names, len(names), gid, trained, faces, after, res)
        if lfw_faces is None:
            continue
        both = {f: np.concatenate([faces[f], lfw_faces[f] + (len(paths) if f == "photo" else 0)]) for f in FACE_FIELDS}
        n_lfw = len(lfw)
        names2 = [*names, "LFW (>= 2 photos each)"]
        gid2 = np.concatenate([gid, np.full(n_lfw, len(names))])
        sex2 = np.concatenate([sex, np.full(n_lfw, "?")])
        trained2 = np.concatenate([trained, np.zeros(n_lfw, bool)])  # the shipped model never trained on LFW
        res2 = group_library(both, len(paths) + n_lfw, gid2, sex2, after)
        per_seed["B"].append((names2, gid2, res2))
        if k == 0:
            print()
            print("=" * 100)
            print()
            print("B: the same strangers in a library with LFW's repeating people")
            report(args, title + f", plus the {n_lfw} LFW photos of the people with >= 2 photos (people who do repeat)",
                   names2, len(names), gid2, trained2, both, after, res2)
    if len(seeds) > 1:
        for lib, runs in per_seed.items():
            if runs:
                seeds_table(lib, seeds, runs)


def seeds_table(lib: str, seeds: list[int], runs: list) -> None:
    """Per group, over the seeds' draws: the share grouped by each model (defaults and the gate off) as
    mean [min, max], the ratio of the means, and the largest group's size per seed."""

    def spread(values: list[float]) -> str:
        return f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"

    names = runs[0][0]
    utk = [i for i, nm in enumerate(names) if nm.startswith("UTK")]
    scut = [i for i, nm in enumerate(names) if nm.startswith("SCUT")]
    subsets = [(name, [i]) for i, name in enumerate(names) if i < len(utk) + len(scut)]
    subsets += [("UTKFace, all", utk), ("SCUT, all", scut), ("all strangers", utk + scut)]
    subsets += [(name, [i]) for i, name in enumerate(names) if i >= len(utk) + len(scut)]
    rows = []
    for name, which in subsets:
        got: dict[str, list[float]] = {}
        for _, gid, res in runs:
            for model, r in res.items():
                f = np.isin(gid, which) & r["found"]
                for tag in ("", "nogate"):
                    got.setdefault(model + tag, []).append(float(r["grouped" + tag][f].mean()))
        rows.append([name, spread(got["shipped"]), spread(got["dlib imported"]),
                     ratio(np.mean(got["shipped"]), np.mean(got["dlib imported"])),
                     spread(got["shippednogate"]), spread(got["dlib importednogate"]),
                     ratio(np.mean(got["shippednogate"]), np.mean(got["dlib importednogate"]))])
    print()
    print(f"{lib}, over the draws of seeds {', '.join(map(str, seeds))}: share grouped with anyone, mean [min, max]")
    print_table(["group", "grouped, shipped", "grouped, dlib", "shipped / dlib", "grouped no gate, shipped",
                 "grouped no gate, dlib", "shipped / dlib"], rows, right=[False] + [True] * 6)
    sizes = []
    for model in ("shipped", "dlib imported"):
        for tag, what in (("", "defaults"), ("nogate", "gate off")):
            per = []
            for _, _, res in runs:
                labels = res[model]["labels" + tag]
                per.append(int(np.bincount(labels[labels >= 0]).max()) if (labels >= 0).any() else 0)
            sizes.append([model, what, ", ".join(map(str, per))])
    print()
    print_table(["model", "settings", "largest group per seed (faces)"], sizes, right=[False, False, True])


def group_library(faces: dict, n: int, gid: np.ndarray, sex: np.ndarray, after: dict) -> dict[str, dict[str, np.ndarray]]:
    """Group the library of these photos' largest faces once per model and setting (people's defaults,
    min_faces 2, the gate off), centred on every face found; per model: per photo arrays (gated, grouped,
    purity, mixed, labels, nn_sim) and the number of groups, one key per setting."""
    from index.quality import quality_scores

    quality = quality_scores(face_signals_of(faces))  # (F,) every face found
    found = np.zeros(n, bool)
    found[faces["photo"][faces["rank"] == 0]] = True
    variants = {"": (3, after), "min2": (2, after), "nogate": (3, {**after, "min_quality": 0.0})}
    res: dict[str, dict[str, np.ndarray]] = {}
    for key, model in MODELS:
        vecs, idx = per_photo(faces, key, n)  # (N, D), (N,)
        q = np.where(idx >= 0, quality[np.maximum(idx, 0)], np.nan)
        r: dict[str, np.ndarray] = {"gated": q < after["min_quality"], "found": found}
        for tag, (min_faces, settings) in variants.items():
            labels, _ = group_photos(vecs, q, settings, min_faces=min_faces, library=faces[key])
            r["grouped" + tag] = labels >= 0
            r["purity" + tag], r["mixed" + tag] = group_stats(labels, gid, sex)
            r["groups" + tag] = np.array(int(labels.max(initial=-1) + 1))
            r["labels" + tag] = labels
        r["nn_sim"] = np.full(n, np.nan)
        r["nn_sim"][found] = nearest_other_similarity(vecs[found])
        res[model] = r
    return res


def report(args: argparse.Namespace, title: str, names: list[str], n_stranger_groups: int, gid: np.ndarray,
           trained: np.ndarray, faces: dict, after: dict, res: dict[str, dict[str, np.ndarray]]) -> None:
    """The four tables: people's defaults per group; min_faces 2, the gate off and the nearest
    similarity; the photos off the shipped model's training side alone; the largest groups. Groups
    from n_stranger_groups on (LFW's people) get a row of their own, outside the "all" rows."""
    s, d = res["shipped"], res["dlib imported"]
    found = s["found"]
    print(f"{title}; {int(found.sum())} with a face (MTCNN, min face {args.min_face} px), {len(faces['photo'])} faces in all; "
          "one face per photo (the largest)")
    print(f"grouping: people's defaults (max_distance {after['max_distance']}, min_samples {after['min_samples']}, "
          f"{after['selection']}, merge {after['merge']}, min_quality {after['min_quality']}, "
          f"{'centred on the library mean' if after['centre'] else 'not centred'}, min_faces 3)")
    print("groups formed (default / min_faces 2 / gate off): " + "; ".join(
        f"{m} {int(r['groups'])} / {int(r['groupsmin2'])} / {int(r['groupsnogate'])}" for m, r in res.items()))
    print()

    def share(mask: np.ndarray, of: np.ndarray) -> str:
        return f"{mask[of].mean():.3f}" if of.any() else "-"

    def mean(x: np.ndarray, of: np.ndarray) -> str:
        v = x[of & np.isfinite(x)]
        return f"{v.mean():.3f}" if len(v) else "-"

    def vs(key: str, f: np.ndarray) -> str:
        return ratio(s[key][f].mean(), d[key][f].mean()) if d[key][f].any() else "-"

    utk = [i for i, nm in enumerate(names) if nm.startswith("UTK")]
    subsets = [(name, gid == i) for i, name in enumerate(names)]
    strangers = gid < n_stranger_groups
    subsets = subsets[:n_stranger_groups] + [("UTKFace, all", np.isin(gid, utk)),
                                             ("SCUT, all", strangers & ~np.isin(gid, utk)), ("all strangers", strangers)]
    subsets += [(name, gid == i) for i, name in enumerate(names) if i >= n_stranger_groups]
    first, second, third = [], [], []
    for name, m in subsets:
        f = m & found
        first.append([name, int(m.sum()), int(f.sum()), f"{int(s['gated'][f].sum())} ({share(s['gated'], f)})",
                      share(s["grouped"], f), share(d["grouped"], f), vs("grouped", f),
                      mean(s["purity"], f), mean(d["purity"], f),
                      share(s["mixed"], f & s["grouped"]), share(d["mixed"], f & d["grouped"])])
        second.append([name, int(f.sum()), share(s["groupedmin2"], f), share(d["groupedmin2"], f), vs("groupedmin2", f),
                       share(s["groupednogate"], f), share(d["groupednogate"], f), vs("groupednogate", f),
                       mean(s["puritynogate"], f), mean(d["puritynogate"], f),
                       mean(s["nn_sim"], f), mean(d["nn_sim"], f)])
        u = f & ~trained  # never trained on: the cohort and strangers side of the split
        third.append([name, f"{trained[f].mean():.3f}" if f.any() else "-", int(u.sum()),
                      share(s["grouped"], u), share(d["grouped"], u), vs("grouped", u),
                      share(s["groupednogate"], u), share(d["groupednogate"], u), vs("groupednogate", u)])
    print("`people`'s defaults (min_faces 3, quality gate 0.1):")
    print_table(["group", "photos", "faces", "left out by the gate", "grouped, shipped", "grouped, dlib",
                 "shipped / dlib", "purity, shipped", "purity, dlib", "mixed sexes, shipped", "mixed sexes, dlib"],
                first, right=[False] + [True] * 10)
    print()
    print("beside it: min_faces 2; the gate off (--min-quality 0, min_faces 3); the nearest other face:")
    print_table(["group", "faces", "grouped min 2, shipped", "grouped min 2, dlib", "shipped / dlib",
                 "grouped no gate, shipped", "grouped no gate, dlib", "shipped / dlib", "purity no gate, shipped",
                 "purity no gate, dlib", "nearest sim, shipped", "nearest sim, dlib"], second,
                right=[False] + [True] * 11)
    print()
    print("the photos off the shipped model's training side (its data split by name hash: cohort and strangers), "
          "grouped in the same library:")
    print_table(["group", "share on the training side", "faces off it", "grouped, shipped", "grouped, dlib",
                 "shipped / dlib", "grouped no gate, shipped", "grouped no gate, dlib", "shipped / dlib"], third,
                right=[False] + [True] * 8)
    print()
    print("the largest groups (people's defaults; then the gate off), by the groups of their faces:")
    big = []
    for model, r in res.items():
        for tag, what in (("", "defaults"), ("nogate", "gate off")):
            labels = r["labels" + tag]
            ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
            for g in ids[np.argsort(-sizes, kind="stable")][:3]:
                members = gid[labels == g]
                big.append([model, what, len(members), ", ".join(
                    f"{names[i]} {c}" for i, c in sorted(zip(*np.unique(members, return_counts=True)), key=lambda x: -x[1]))])
    print_table(["model", "settings", "faces", "made of"], big, right=[False, False, True, False])
    print()
    print("grouped = share of the faces found put into a group with anyone (a face left out by the gate is not "
          "grouped); purity = mean share of a grouped face's group-mates from its own group (race and set); mixed "
          "sexes = share of the grouped faces whose group mixes sexes; nearest sim = mean cosine similarity to the "
          "nearest other face of the library (the model's vectors, not centred; compare groups within a model)")


if __name__ == "__main__":
    main()
