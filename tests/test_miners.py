import math

import pytest
import torch

from verify.training.losses import TripletMarginLoss
from verify.training.miners import BatchAllMiner, BatchHardMiner, SemiHardMiner, pairwise_distances


def _dist(e, i, j):
    return math.sqrt(sum((float(e[i, d]) - float(e[j, d])) ** 2 for d in range(e.shape[1])))


def _batch(seed, n_ids=4, per_id=3, dim=3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_ids * per_id, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    perm = torch.randperm(len(labels), generator=g)
    return emb[perm], labels[perm]


def _slow_batch_hard(e, y):
    out = []
    for a in range(len(y)):
        pos = [(_dist(e, a, p), p) for p in range(len(y)) if p != a and y[p] == y[a]]
        neg = [(_dist(e, a, n), n) for n in range(len(y)) if y[n] != y[a]]
        if pos and neg:
            out.append((a, max(pos)[0], min(neg)[0]))
    return out


def _slow_semi_hard(e, y, margin):
    out = []
    for a in range(len(y)):
        for p in range(len(y)):
            if p == a or y[p] != y[a]:
                continue
            dap = _dist(e, a, p)
            band = [(_dist(e, a, n), n) for n in range(len(y)) if y[n] != y[a] and dap < _dist(e, a, n) < dap + margin]
            if band:
                out.append((a, p, min(band)[1]))
    return out


def _slow_batch_all(e, y, margin=None):
    out = []
    for a in range(len(y)):
        for p in range(len(y)):
            for n in range(len(y)):
                if p != a and y[p] == y[a] and y[n] != y[a]:
                    if margin is None or _dist(e, a, p) - _dist(e, a, n) + margin > 0:
                        out.append((a, p, n))
    return out


def test_pairwise_distances_match_cdist_and_have_finite_grad_at_zero():
    emb, _ = _batch(0)
    d = pairwise_distances(emb)
    assert torch.allclose(d, torch.cdist(emb, emb), atol=1e-10)
    assert torch.allclose(pairwise_distances(emb, squared=True), torch.cdist(emb, emb) ** 2, atol=1e-10)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)  # rows 0 and 1 coincide
    d = pairwise_distances(x)
    assert d[0, 1] == 0 and d[0, 0] == 0
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    h = pairwise_distances(torch.randn(5, 4).half())
    assert h.dtype == torch.float32  # half inputs are promoted


def test_batch_hard_hand_case():
    # 1-D points: A = {0.0, 1.0, 1.5}, B = {0.3, 3.0}
    emb = torch.tensor([[0.0], [1.0], [1.5], [0.3], [3.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    a, p, n = BatchHardMiner()(emb, labels)
    got = {(int(x), int(y), int(z)) for x, y, z in zip(a, p, n)}
    assert got == {(0, 2, 3), (1, 0, 3), (2, 0, 3), (3, 4, 0), (4, 3, 2)}


@pytest.mark.parametrize("seed", range(5))
def test_batch_hard_matches_slow_loop(seed):
    emb, y = _batch(seed)
    a, p, n = BatchHardMiner()(emb, y)
    assert a.dtype == torch.long
    slow = _slow_batch_hard(emb, y.tolist())
    assert a.tolist() == [t[0] for t in slow]
    for ai, pi, ni, (_, dp, dn) in zip(a.tolist(), p.tolist(), n.tolist(), slow):
        assert math.isclose(_dist(emb, ai, pi), dp, rel_tol=1e-9) and y[pi] == y[ai] and pi != ai
        assert math.isclose(_dist(emb, ai, ni), dn, rel_tol=1e-9) and y[ni] != y[ai]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("margin", [0.3, 1.0])
def test_semi_hard_matches_slow_loop(seed, margin):
    emb, y = _batch(seed, n_ids=3, per_id=4)
    miner = SemiHardMiner(margin)
    got = list(zip(*(t.tolist() for t in miner(emb, y))))
    assert got == _slow_semi_hard(emb, y.tolist(), margin)
    assert miner.last_num_triplets == len(got)


def test_semi_hard_fallback_policy_hand_case():
    # 1-D: identity A = {0: 0.0, 1: 1.0}, identity B = {2: -0.5, 3: 3.0}.
    # (0,1): d_ap = 1, negatives at 0.5 (hard) and 3.0 (beyond the band (1, 1.2)).
    # (1,0): d_ap = 1, negatives at 1.5 and 2.0, both beyond the band.
    # (2,3), (3,2): d_ap = 3.5, every negative is nearer (hard): never used.
    emb = torch.tensor([[0.0], [1.0], [-0.5], [3.0]])
    labels = torch.tensor([0, 0, 1, 1])

    def triplets(miner):
        return list(zip(*(t.tolist() for t in miner(emb, labels))))

    assert triplets(SemiHardMiner(0.2)) == []
    assert triplets(SemiHardMiner(0.2, fallback="easy")) == [(0, 1, 3), (1, 0, 2)]
    # A wider margin puts 1.5 inside the band of (1,0): both policies take it.
    assert triplets(SemiHardMiner(0.6)) == [(1, 0, 2)]
    assert triplets(SemiHardMiner(0.6, fallback="easy")) == [(0, 1, 3), (1, 0, 2)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("margin", [None, 0.5])
def test_batch_all_matches_slow_loop(seed, margin):
    emb, y = _batch(seed, n_ids=3, per_id=3)
    got = list(zip(*(t.tolist() for t in BatchAllMiner(margin)(emb, y))))
    assert got == _slow_batch_all(emb, y.tolist(), margin)
    if margin is None:
        assert len(got) == 9 * 2 * 6  # 9 anchors x 2 positives x 6 negatives


@pytest.mark.parametrize("miner", [BatchHardMiner(), SemiHardMiner(0.2), BatchAllMiner(), BatchAllMiner(0.2)])
@pytest.mark.parametrize("labels", [[3, 3, 3, 3], [0, 1, 2, 3]], ids=["one-identity", "singletons"])
def test_no_valid_triplet_gives_empty_and_zero_loss_with_grad(miner, labels):
    emb = torch.randn(4, 8, requires_grad=True)
    a, p, n = miner(emb, torch.tensor(labels))
    assert a.numel() == p.numel() == n.numel() == 0 and a.dtype == torch.long
    for reduction in ("mean", "sum", "mean_active"):
        loss = TripletMarginLoss(reduction=reduction)(emb, a, p, n)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(emb.grad).all() and (emb.grad == 0).all()
        emb.grad = None


def test_miners_do_not_track_gradients():
    emb = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    for miner in (BatchHardMiner(), SemiHardMiner(1.0), BatchAllMiner()):
        out = miner(emb, y)
        assert not any(t.requires_grad for t in out)


def test_label_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one per embedding"):
        BatchHardMiner()(torch.randn(4, 2), torch.tensor([0, 1, 0]))
