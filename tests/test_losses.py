import math

import pytest
import torch

from verify.training.losses import ArcFaceLoss, CosFaceLoss, MarginCosineProduct, TripletMarginLoss
from verify.training.miners import BatchHardMiner

# anchor 0 at the origin; positive 1 at distance 0.5; negatives 2 (distance 1.0) and 3 (distance 0.6)
EMB = [[0.0, 0.0], [0.3, 0.4], [0.6, 0.8], [0.0, 0.6]]
A, P, N = torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([2, 3])


def _emb():
    return torch.tensor(EMB, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize(
    "reduction, expected",
    [("none", [0.0, 0.1]), ("sum", 0.1), ("mean", 0.05), ("mean_active", 0.1)],
)
def test_triplet_values_by_hand(reduction, expected):
    loss_fn = TripletMarginLoss(margin=0.2, reduction=reduction)
    loss = loss_fn(_emb(), A, P, N)
    # per triplet: relu(0.5 - 1.0 + 0.2) = 0, relu(0.5 - 0.6 + 0.2) = 0.1
    assert torch.allclose(loss, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert loss_fn.last_active_fraction == 0.5
    assert loss_fn.last_num_triplets == 2


def test_triplet_squared_and_cosine_distances_by_hand():
    sq = TripletMarginLoss(margin=0.2, reduction="none", distance="squared")(_emb(), A, P, N)
    # 0.25 - 1.0 + 0.2 < 0 ; 0.25 - 0.36 + 0.2 = 0.09
    assert torch.allclose(sq, torch.tensor([0.0, 0.09], dtype=torch.float64), atol=1e-12)
    e = torch.tensor([[1.0, 0.0], [math.cos(0.5), math.sin(0.5)], [0.0, 1.0]], dtype=torch.float64)
    cos = TripletMarginLoss(margin=0.2, reduction="none", distance="cosine")(e, *(torch.tensor([i]) for i in (0, 1, 2)))
    expected = max(0.0, (1 - math.cos(0.5)) - 1.0 + 0.2)
    assert cos.item() == pytest.approx(expected)
    cos2 = TripletMarginLoss(margin=1.0, reduction="none", distance="cosine")(e, *(torch.tensor([i]) for i in (0, 1, 2)))
    assert cos2.item() == pytest.approx((1 - math.cos(0.5)) - 1.0 + 1.0)


def test_triplet_gradient_step_reduces_loss_and_points_the_right_way():
    emb = _emb()
    loss_fn = TripletMarginLoss(margin=0.2)
    loss = loss_fn(emb, A, P, N)
    loss.backward()
    g = emb.grad
    # Only the active triplet (0, 1, 3) pulls: the positive moves toward the anchor, the negative away.
    assert torch.dot(g[1], torch.tensor(EMB[1], dtype=torch.float64)) > 0  # -grad points to the anchor (origin)
    assert torch.dot(g[3], torch.tensor(EMB[3], dtype=torch.float64)) < 0  # -grad points away from it
    assert torch.all(g[2] == 0)  # inactive negative gets nothing
    with torch.no_grad():
        stepped = emb - 0.1 * g
    assert loss_fn(stepped, A, P, N) < loss


def test_triplet_identical_points_have_finite_gradient():
    emb = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)  # all coincide
    loss = TripletMarginLoss(margin=0.2)(emb, torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    assert loss.item() == pytest.approx(0.2)
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_triplet_mean_active_zero_when_nothing_active_and_half_input():
    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0]], requires_grad=True)
    loss_fn = TripletMarginLoss(margin=0.2, reduction="mean_active")
    loss = loss_fn(emb, torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    assert loss.item() == 0.0 and loss_fn.last_active_fraction == 0.0
    loss.backward()
    assert torch.isfinite(emb.grad).all()
    half = TripletMarginLoss(margin=0.2)(torch.tensor(EMB).half(), A, P, N)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(0.05, abs=1e-3)


def test_triplet_with_miner_trains_toward_separation():
    torch.manual_seed(0)
    emb = torch.randn(12, 4, requires_grad=True)
    labels = torch.arange(3).repeat_interleave(4)
    miner, loss_fn = BatchHardMiner(), TripletMarginLoss(margin=0.2)
    opt = torch.optim.SGD([emb], lr=0.3)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(emb, *miner(emb, labels))
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_triplet_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        TripletMarginLoss(reduction="avg")
    with pytest.raises(ValueError, match="differ in length"):
        TripletMarginLoss()(torch.randn(3, 2), torch.tensor([0]), torch.tensor([1, 2]), torch.tensor([2]))


def _unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_cosface_by_hand():
    head = CosFaceLoss(embedding_dim=2, num_classes=3, scale=10.0, margin=0.3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]))  # rows normalised inside
    emb = torch.stack([_unit(2.0, 1.0), _unit(0.0, 1.0)]) * 3.0  # norm does not matter
    labels = torch.tensor([0, 2])
    c0, c1 = 2 / math.sqrt(5), 1 / math.sqrt(5)
    logits0 = [10 * (c0 - 0.3), 10 * c1, 10 * -c0]
    logits1 = [0.0, 10.0, 10 * (0.0 - 0.3)]

    def ce(logits, y):
        return -logits[y] + math.log(sum(math.exp(v) for v in logits))

    expected = (ce(logits0, 0) + ce(logits1, 2)) / 2
    assert head(emb, labels).item() == pytest.approx(expected, rel=1e-5)
    assert head.last_accuracy == 0.5  # plain cosines: sample 0 -> class 0 (right), sample 1 -> class 1 (wrong)
    mcp = MarginCosineProduct(2, 3, scale=10.0, margin=0.3)
    with torch.no_grad():
        mcp.weight.copy_(head.weight)
    assert torch.allclose(mcp(emb, labels)[0], torch.tensor(logits0), atol=1e-5)
    assert torch.allclose(head.logits(emb)[1], torch.tensor([0.0, 10.0, 0.0]), atol=1e-5)


def test_cosface_half_and_autocast_are_float32_and_finite():
    head = CosFaceLoss(embedding_dim=16, num_classes=5)
    emb = torch.randn(8, 16)
    labels = torch.randint(0, 5, (8,))
    ref = head(emb, labels)
    out_half = head(emb.half(), labels)
    assert out_half.dtype == torch.float32 and torch.isfinite(out_half)
    assert out_half.item() == pytest.approx(ref.item(), rel=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = head(emb, labels)
    assert out_ac.dtype == torch.float32 and out_ac.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("cls", [CosFaceLoss, ArcFaceLoss])
def test_identity_losses_learn(cls):
    torch.manual_seed(0)
    head = cls(embedding_dim=8, num_classes=4)
    emb = torch.randn(16, 8, requires_grad=True)
    labels = torch.arange(4).repeat(4)
    opt = torch.optim.SGD([emb, *head.parameters()], lr=0.05)
    first = head(emb, labels).item()
    for _ in range(30):
        opt.zero_grad()
        loss = head(emb, labels)
        loss.backward()
        assert torch.isfinite(emb.grad).all()
        opt.step()
    assert head(emb, labels).item() < first
    assert head.last_accuracy == 1.0


def test_identity_loss_label_errors():
    head = CosFaceLoss(4, 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))


def test_arcface_by_hand_both_sides_of_the_threshold():
    s, m = 8.0, 0.5
    head = ArcFaceLoss(embedding_dim=2, num_classes=2, scale=s, margin=m)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    theta_small, theta_big = 0.4, math.pi - 0.2  # pi - 0.2 > pi - m: past the threshold
    emb = torch.stack([_unit(math.cos(theta_small), math.sin(theta_small)), _unit(math.cos(theta_big), math.sin(theta_big))])
    labels = torch.tensor([0, 0])
    out = MarginCosineProduct.forward(head, emb, labels)  # the margin logits behind the CE
    assert out[0, 0].item() == pytest.approx(s * math.cos(theta_small + m), rel=1e-5)
    assert out[1, 0].item() == pytest.approx(s * (math.cos(theta_big) - math.sin(math.pi - m) * m), rel=1e-5)
    assert out[0, 1].item() == pytest.approx(s * math.sin(theta_small), rel=1e-5)  # non-target: plain cosine
    easy = ArcFaceLoss(2, 2, scale=s, margin=m, easy_margin=True)
    with torch.no_grad():
        easy.weight.copy_(head.weight)
    out_easy = MarginCosineProduct.forward(easy, emb, labels)
    assert out_easy[1, 0].item() == pytest.approx(s * math.cos(theta_big), rel=1e-5)  # cos < 0: no margin


def test_arcface_gradient_finite_when_embedding_equals_a_class_weight():
    head = ArcFaceLoss(embedding_dim=3, num_classes=2)
    emb = head.weight.detach()[:1].clone().requires_grad_(True)  # cos = 1 exactly for its class
    loss = head(emb, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
