"""scripts/filter_faces.py (issue 18): near duplicates and LFW people removed by the teacher's vector,
checked against brute force and on real photos (the shipped model stands in for the teacher)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import filter_faces  # noqa: E402
import prepare_faces  # noqa: E402


def _unit(rng, n, d=16):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_near_duplicates_match_brute_force(rng):
    v = _unit(rng, 300)
    v[50] = v[10]  # exact copy
    v[120] = v[10] + 0.01 * rng.normal(size=16)  # near copy of a kept row
    v[121] = v[50]  # copy of a removed row, which also matches the kept row 10
    v[7] = v[3] + 0.01 * rng.normal(size=16)  # inside the reference block: never removed
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    of = filter_faces.near_duplicates(v, 0.99, n_fixed=8, block=64)
    # brute force: greedy in order over kept rows
    kept, want = [], np.full(len(v), -1)
    for i in range(len(v)):
        hits = [j for j in kept if v[i] @ v[j] >= 0.99]
        if i >= 8 and hits:
            want[i] = hits[0]
        else:
            kept.append(i)
    assert np.array_equal(of, want)
    assert of[50] == 10 and of[120] == 10 and of[121] == 10 and of[7] == -1


def test_person_scores_match_brute_force(rng):
    q, g = _unit(rng, 70), _unit(rng, 33)
    people = np.sort(rng.integers(0, 9, size=33))  # rows grouped by person
    q[5] = np.nan
    skip = np.full(70, -1)
    skip[:33] = np.arange(33)  # the first queries may not use one gallery row each
    best, who, second = filter_faces.person_scores(q, g, people, skip=skip, block=16)
    for i in range(70):
        if i == 5:
            assert best[i] == second[i] == -np.inf
            continue
        sim = q[i] @ g.T
        if skip[i] >= 0:
            sim[skip[i]] = -np.inf
        per = {p: sim[people == p].max() for p in np.unique(people)}
        top = max(per, key=per.get)
        assert who[i] == top and np.isclose(best[i], per[top], atol=1e-6)
        assert np.isclose(second[i], max(v for p, v in per.items() if p != top), atol=1e-6)
    with pytest.raises(ValueError, match="grouped by person"):
        filter_faces.person_scores(q, g, people[::-1])


def test_margin_rule_spares_faces_close_to_many_people(rng):
    """A face close to one LFW person alone is removed by both rules; a face as close to two people
    (a crowded part of the teacher's space) only by the absolute one."""
    base = _unit(rng, 3)
    lfw = np.stack([base[0], base[0], base[1], base[2]])  # A, A, B, C
    names = ["A", "A", "B", "C"]
    lone = base[0] + 0.05 * _unit(rng, 1)[0]
    crowd = base[1] + base[2]  # halfway between B and C
    faces = np.stack([lone, crowd, _unit(rng, 1)[0]])
    faces /= np.linalg.norm(faces, axis=1, keepdims=True)
    sims = faces @ lfw.T
    thr = float(min(sims[0].max(), sims[1].max())) - 1e-3  # both close enough for the absolute rule
    drop, matched, best = filter_faces.lfw_matches(faces, lfw, names, similarity=thr)
    assert drop[:2].tolist() == [True, True] and matched[0] == "A"
    drop, matched, best = filter_faces.lfw_matches(faces, lfw, names, similarity=thr, margin=0.05, floor=thr)
    assert drop.tolist() == [True, False, False] and matched[0] == "A"
    assert np.allclose(best, sims.max(axis=1), atol=1e-6)


def test_name_fraction_splits_stably():
    names = [f"{i:06d}.jpg" for i in range(4000)]
    f = np.array([filter_faces.name_fraction(n) for n in names])
    assert ((f >= 0) & (f < 1)).all()
    assert abs((f < 0.4).mean() - 0.4) < 0.03
    assert filter_faces.name_fraction("a.jpg") == filter_faces.name_fraction("a.jpg")


@pytest.fixture(scope="module")
def shipped():
    from verify.model.file import Embedder

    return Embedder.load()


def test_filter_moves_duplicates_and_lfw_people_and_keeps_the_rest(tmp_path, shared_data, shipped):
    """A root of 8 CelebA faces, a re-encoded copy of one of them, and one LFW photo of Paul Wolfowitz
    aligned into the CelebA frame; the LFW folder holds his *other* photos."""
    root = tmp_path / "set"
    img = root / "img_align_celeba"
    img.mkdir(parents=True)
    celeba = sorted((shared_data / "celeba" / "img_align_celeba").glob("*.jpg"))[::700][:8]
    for i, p in enumerate(celeba):
        shutil.copy(p, img / f"c{i}.jpg")
    Image.open(celeba[2]).save(img / "copy.jpg", quality=70)  # same photo, another JPEG
    bush = sorted((shared_data / "lfw" / "lfw-deepfunneled" / "Paul_Wolfowitz").glob("*.jpg"))
    assert len(bush) >= 4
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(bush[0], src / "bush.jpg")
    prepare_faces.prepare(src, tmp_path / "bush_prepared")
    shutil.copy(tmp_path / "bush_prepared" / "img_align_celeba" / prepare_faces.out_name("bush.jpg"), img / "bush.jpg")
    lfw = tmp_path / "lfw" / "Paul_Wolfowitz"
    lfw.mkdir(parents=True)
    for p in bush[1:]:
        shutil.copy(p, lfw / p.name)

    roots = [filter_faces.teacher_vectors(root, shipped, progress=False)]
    lfw_vec = filter_faces.lfw_vectors(tmp_path / "lfw", shipped, progress=False)
    sim_bush = (roots[0].vectors @ lfw_vec[0].T).max(axis=1)
    names = roots[0].names
    # thresholds for this stand-in teacher, between what these photos score
    lfw_thr = (sim_bush[names.index("bush.jpg")] + np.delete(sim_bush, names.index("bush.jpg")).max()) / 2
    counts = filter_faces.filter_roots(roots, lfw_vec, [], dup_similarity=0.97, lfw_similarity=float(lfw_thr))
    assert counts[str(root)] == {"kept": 8, "lfw_match": 1, "near_dup": 1}
    left = sorted(p.name for p in img.iterdir())
    assert "bush.jpg" not in left and ("copy.jpg" in left) != ("c2.jpg" in left)
    assert sorted(p.name for p in (root / "removed").iterdir()) == sorted({"bush.jpg", "copy.jpg", "c2.jpg"} - set(left))
    rows = (root / "removed.tsv").read_text().splitlines()
    assert rows[0].startswith("name\treason") and any("lfw_match\tPaul_Wolfowitz" in r for r in rows)
    assert json.loads((root / "counts.json").read_text())["lfw_match"] == 1
    # vectors are stored: a second pass embeds nothing and removes nothing more
    again = filter_faces.teacher_vectors(root, shipped, progress=False)
    assert again.names == left
    c2 = filter_faces.filter_roots([again], lfw_vec, [], dup_similarity=0.97, lfw_similarity=float(lfw_thr))
    assert c2[str(root)] == {"kept": 8, "lfw_match": 0, "near_dup": 0}
    # hold out a cohort and strangers by name
    moved = filter_faces.hold_out(root, 0.4, 0.2)
    assert sum(moved.values()) + len(filter_faces.root_images(root)) == 8
    for part in ("cohort", "strangers"):
        for p in (root / part).iterdir() if (root / part).is_dir() else []:
            f = filter_faces.name_fraction(p.name)
            assert (f < 0.4) if part == "cohort" else (0.4 <= f < 0.6)
