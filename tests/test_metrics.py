import math

import numpy as np
import pytest

from verify.evaluation.metrics import (
    accuracy_at,
    attribute_accuracy,
    auc,
    best_accuracy_threshold,
    default_folds,
    eer,
    kfold_accuracy,
    majority_baseline,
    roc_curve,
    summarise_verification,
    tar_at_far,
    threshold_at_far,
)

# Hand-made set with a unique best threshold: accept >= t in (0.40, 0.45] gives 9/10 correct,
# every other cut at most 8/10. The midpoint rule puts the threshold at 0.425.
GEN = [0.55, 0.7, 0.8, 0.9, 0.45]
IMP = [0.1, 0.2, 0.3, 0.4, 0.6]


def _pairs(gen, imp):
    return np.r_[gen, imp].astype(float), np.r_[np.ones(len(gen)), np.zeros(len(imp))].astype(bool)


def test_best_threshold_by_hand_for_similarities_and_distances():
    s, y = _pairs(GEN, IMP)
    t, acc = best_accuracy_threshold(s, y)
    assert t == pytest.approx(0.425) and acc == pytest.approx(0.9)
    assert accuracy_at(s, y, t) == pytest.approx(0.9)
    assert accuracy_at(s, y, 0.65) == pytest.approx(0.8)
    td, accd = best_accuracy_threshold(1 - s, y, distances=True)
    assert td == pytest.approx(0.575) and accd == pytest.approx(0.9)
    assert accuracy_at(1 - s, y, td, distances=True) == pytest.approx(0.9)


def test_kfold_perfectly_separable_is_one():
    rng = np.random.default_rng(0)
    s, y = _pairs(rng.uniform(0.6, 1.0, 300), rng.uniform(-1.0, 0.5, 300))
    mean, std, thresholds = kfold_accuracy(s, y)
    assert mean == 1.0 and std == 0.0 and len(thresholds) == 10
    assert np.all((thresholds > 0.5) & (thresholds < 0.6))


def test_kfold_known_answer_with_given_folds():
    # Ten copies of the hand-made set, one per fold: every training set has the same optimum (0.425),
    # which scores exactly 9/10 on each held-out copy.
    s1, y1 = _pairs(GEN, IMP)
    s = np.tile(s1, 10)
    y = np.tile(y1, 10)
    folds = np.repeat(np.arange(10), len(s1))
    mean, std, thresholds = kfold_accuracy(s, y, folds=folds)
    assert mean == pytest.approx(0.9) and std == pytest.approx(0.0)
    assert np.allclose(thresholds, 0.425)
    mean_d, _, thr_d = kfold_accuracy(1 - s, y, folds=folds, distances=True)
    assert mean_d == pytest.approx(0.9) and np.allclose(thr_d, 0.575)


def test_kfold_gaussian_matches_theory():
    # genuine ~ N(1, 1), impostor ~ N(-1, 1): best threshold 0, accuracy Phi(1) = 0.8413
    rng = np.random.default_rng(1)
    s, y = _pairs(rng.normal(1, 1, 3000), rng.normal(-1, 1, 3000))
    mean, std, thresholds = kfold_accuracy(s, y)
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert mean == pytest.approx(phi1, abs=0.015)
    assert std < 0.03 and np.all(np.abs(thresholds) < 0.15)


def test_default_folds_are_stratified():
    y = np.r_[np.ones(30), np.zeros(50)].astype(bool)
    f = default_folds(y, 10)
    for k in range(10):
        assert (f[y] == k).sum() == 3 and (f[~y] == k).sum() == 5


def test_threshold_at_far_exact_on_uniform_impostors():
    imp = np.random.default_rng(2).uniform(0, 1, 1000)
    for far in (1e-1, 1e-2, 1e-3):
        t = threshold_at_far(imp, far)
        assert np.mean(imp >= t) == pytest.approx(far)
        # The threshold is as low as allowed: the next lower impostor score would exceed the budget.
        lower = imp[imp < t].max()
        assert np.mean(imp >= lower) > far
        td = threshold_at_far(1 - imp, far, distances=True)
        assert np.mean((1 - imp) <= td) == pytest.approx(far)


def test_threshold_at_far_ties_never_exceed_target_and_zero_budget():
    imp = np.r_[np.full(5, 0.9), np.linspace(0, 0.5, 995)]  # top 5 tied, budget 0.001*1000 = 1
    t = threshold_at_far(imp, 1e-3)
    assert np.mean(imp >= t) == 0.0 and t > 0.9  # the tied group cannot be split: reject all of it
    assert np.mean(imp >= threshold_at_far(imp, 5e-3)) == pytest.approx(5e-3)  # budget 5 takes the group
    t0 = threshold_at_far(np.array([0.1, 0.2, 0.3]), 0.1)  # 0.1 * 3 < 1: accept no impostor
    assert t0 > 0.3 and t0 < 0.3 + 1e-9


def test_tar_at_far_by_hand():
    imp = np.arange(1000) / 1000  # 0.000 .. 0.999
    gen = np.array([0.985, 0.99, 0.995, 1.5])
    s, y = _pairs(gen, imp)
    tar, t = tar_at_far(s, y, 1e-2)
    assert t == pytest.approx(0.99) and tar == pytest.approx(0.75)
    tar_d, t_d = tar_at_far(-s, y, 1e-2, distances=True)
    assert t_d == pytest.approx(-0.99) and tar_d == pytest.approx(0.75)


def test_eer_hand_cases_and_symmetric_gaussians():
    assert eer(*_pairs([1, 2, 3, 4], [-1, -2, -3, -4]))[0] == 0.0
    value, t = eer(*_pairs([-0.5, 1, 2, 3], [0.5, -1, -2, -3]))
    assert value == pytest.approx(0.25)
    x = np.random.default_rng(3).normal(1, 1, 5001)
    value, t = eer(*_pairs(x, -x))  # mirror image: FAR(t) = FRR(-t), crossing at t = 0
    assert value == pytest.approx(np.mean(x < 0), abs=1 / 5001)
    assert abs(t) <= np.sort(np.abs(x))[1]
    value_d, t_d = eer(*_pairs(-x, x), distances=True)
    assert value_d == pytest.approx(value) and t_d == pytest.approx(-t)


def test_auc_perfect_reversed_constant_and_mann_whitney():
    s, y = _pairs([0.9, 0.8, 0.7], [0.1, 0.2])
    assert auc(*roc_curve(s, y)[:2]) == 1.0
    assert auc(*roc_curve(-s, y)[:2]) == 0.0
    assert auc(*roc_curve(np.zeros(6), np.array([1, 0, 1, 0, 1, 0]))[:2]) == 0.5
    rng = np.random.default_rng(4)
    s = rng.integers(0, 20, 200).astype(float)  # many ties
    y = rng.random(200) < 0.4
    g, i = s[y], s[~y]
    mw = np.mean((g[:, None] > i[None, :]) + 0.5 * (g[:, None] == i[None, :]))
    assert auc(*roc_curve(s, y)[:2]) == pytest.approx(mw, abs=1e-12)
    big = rng.random(20000)
    assert auc(*roc_curve(big, rng.random(20000) < 0.5)[:2]) == pytest.approx(0.5, abs=0.02)


def test_roc_curve_shape():
    s, y = _pairs(GEN, IMP)
    far, tar, thr = roc_curve(s, y)
    assert far[0] == 0 and tar[0] == 0 and far[-1] == 1 and tar[-1] == 1 and np.isinf(thr[0])
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0) and np.all(np.diff(thr) < 0)
    _, _, thr_d = roc_curve(1 - s, y, distances=True)
    assert np.isinf(thr_d[0]) and thr_d[0] < 0 and np.all(np.diff(thr_d) > 0)


def test_summarise_verification():
    rng = np.random.default_rng(5)
    s, y = _pairs(rng.normal(1, 1, 2000), rng.normal(-1, 1, 2000))
    out = summarise_verification(s, y, fars=(1e-2, 1e-3, 1e-4))
    assert set(out) >= {"accuracy", "accuracy_std", "auc", "eer", "tar_at_far", "pairs", "threshold"}
    assert out["pairs"] == 4000 and out["genuine"] == 2000 and out["impostor"] == 2000
    assert out["accuracy"] == pytest.approx(kfold_accuracy(s, y)[0])
    assert out["eer"] == pytest.approx(eer(s, y)[0])
    assert out["tar_at_far"]["1e-02"] == pytest.approx(tar_at_far(s, y, 1e-2)[0])
    assert out["tar_at_far"]["1e-04"] is None  # 2000 impostors cannot measure 1e-4
    assert 0.9 < out["auc"] < 0.95 and abs(out["threshold"]) < 0.2
    assert all(isinstance(v, (int, float)) for k, v in out.items() if k not in ("tar_at_far", "fold_thresholds", "accuracy_oracle_note"))
    out_d = summarise_verification(-s, y, distances=True)
    assert out_d["accuracy"] == pytest.approx(out["accuracy"]) and out_d["threshold"] == pytest.approx(-out["threshold"])


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="non-finite"):
        kfold_accuracy(np.array([0.1, np.nan]), np.array([1, 0]))
    with pytest.raises(ValueError, match="equal length"):
        eer(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="both genuine and impostor"):
        roc_curve(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="0/1"):
        accuracy_at(np.zeros(2), np.array([2, 0]), 0.5)
    with pytest.raises(ValueError, match="far must be"):
        threshold_at_far(np.zeros(3), 1.5)


def test_attribute_accuracy_by_hand():
    targets = np.array([[1, -1, 1], [-1, -1, 1], [1, 1, -1], [1, -1, -1]])  # CelebA -1/1 style
    logits = np.array([[2.0, -1.0, 0.5], [1.0, -3.0, 2.0], [0.5, -0.1, -1.0], [3.0, 0.2, 1.0]])
    per, mean = attribute_accuracy(logits, targets)
    assert np.allclose(per, [0.75, 0.5, 0.75]) and mean == pytest.approx(2.0 / 3)
    probs = 1 / (1 + np.exp(-logits))
    per_p, _ = attribute_accuracy(probs, (targets > 0).astype(int), kind="probs")
    assert np.allclose(per_p, per)
    with pytest.raises(ValueError, match="outside"):
        attribute_accuracy(logits, targets, kind="probs")
    with pytest.raises(ValueError, match="shape"):
        attribute_accuracy(logits[:, :2], targets)


def test_majority_baseline_eval_and_reference():
    ev = np.array([[1, 0], [1, 0], [0, 0], [1, 1]])
    per, mean = majority_baseline(ev)  # majorities on eval: attr0 -> 1, attr1 -> 0
    assert np.allclose(per, [0.75, 0.75]) and mean == pytest.approx(0.75)
    ref = np.array([[0, 1], [0, 1], [1, 1]])  # train majorities: attr0 -> 0, attr1 -> 1
    per_r, mean_r = majority_baseline(ev, ref)
    assert np.allclose(per_r, [0.25, 0.25]) and mean_r == pytest.approx(0.25)


def test_summarise_verification_without_accuracy_keeps_the_roc_figures():
    rng = np.random.default_rng(6)
    s, y = _pairs(rng.normal(1, 1, 500), rng.normal(-1, 1, 3000))
    full = summarise_verification(s, y, fars=(1e-2, 1e-3))
    roc_only = summarise_verification(s, y, fars=(1e-2, 1e-3), accuracy=False)
    assert "accuracy" not in roc_only and "threshold" not in roc_only and "accuracy_oracle" not in roc_only
    assert {k: full[k] for k in roc_only} == roc_only
