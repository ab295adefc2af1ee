import logging
from collections import Counter

import numpy as np
import pytest
import torch

from verify.training.samplers import PKSampler


def _labels(counts):
    """Labels with identity c repeated counts[c] times, shuffled so identities are interleaved."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(1).permutation(labels)


def _check_pk(batch, labels, p, k):
    assert len(batch) == p * k
    got = Counter(int(labels[i]) for i in batch)
    assert len(got) == p
    assert set(got.values()) == {k}


def test_every_batch_is_p_identities_times_k_images():
    counts = [1, 2, 3, 5, 8, 13, 4, 4, 6, 7, 9, 10, 2, 1, 11]
    labels = _labels(counts)
    s = PKSampler(labels, p=4, k=4, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == sum(c for c in counts if c >= 2) // 16
    singletons = {c for c, n in enumerate(counts) if n < 2}
    for b in batches:
        _check_pk(b, labels, 4, 4)
        assert all(0 <= i < len(labels) for i in b)
        assert not singletons & {int(labels[i]) for i in b}  # cannot form a positive pair
    # Identities with >= K images never repeat an image within a batch.
    for b in batches:
        for c in {int(labels[i]) for i in b}:
            imgs = [i for i in b if labels[i] == c]
            if counts[c] >= 4:
                assert len(set(imgs)) == 4


def test_one_epoch_visits_every_image_once_when_counts_divide():
    labels = _labels([8] * 12)  # 12 identities x 8 images, P=4, K=4: 6 batches cover all 96 images
    s = PKSampler(labels, p=4, k=4, seed=0)
    seen = [i for b in s for i in b]
    assert sorted(seen) == list(range(96))


def test_determinism_and_epochs():
    labels = _labels([6] * 20)
    a = PKSampler(labels, p=5, k=3, seed=7)
    b = PKSampler(labels, p=5, k=3, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    a.set_epoch(0)
    assert list(a) == first
    assert list(PKSampler(labels, p=5, k=3, seed=8)) != first


def test_disjoint_splits_never_share_identities():
    labels = _labels([5] * 30)
    ids = np.unique(labels)
    split_a = np.flatnonzero(np.isin(labels, ids[:15]))
    split_b = np.flatnonzero(np.isin(labels, ids[15:]))
    seen = []
    for split in (split_a, split_b):
        s = PKSampler(labels[split], p=4, k=2, seed=0)
        seen.append({int(labels[split[i]]) for b in s for i in b})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_replacement_policy_for_small_identities(caplog):
    counts = [3, 3, 6, 6, 6]  # identities 0 and 1 have fewer than K=4 images
    labels = _labels(counts)
    small = {0, 1}
    with_repl = PKSampler(labels, p=2, k=4, batches_per_epoch=40, replacement=True, seed=0)
    used_small = set()
    for b in with_repl:
        _check_pk(b, labels, 2, 4)
        for c in small & {int(labels[i]) for i in b}:
            imgs = [i for i in b if labels[i] == c]
            assert len(set(imgs)) == 3  # all three images, plus one repeat
            used_small.add(c)
    assert used_small == small

    with caplog.at_level(logging.INFO, logger="verify.training.samplers"):
        no_repl = PKSampler(labels, p=2, k=4, batches_per_epoch=40, replacement=False, seed=0)
    assert "skipping 2 identities" in caplog.text
    assert no_repl.skipped_identities == 2
    for b in no_repl:
        _check_pk(b, labels, 2, 4)
        assert not small & {int(labels[i]) for i in b}


def test_ddp_ranks_are_disjoint_equal_and_cover_the_global_list():
    labels = _labels([4] * 40)
    world = 3
    per_rank = [list(PKSampler(labels, p=4, k=2, batches_per_epoch=10, seed=5, rank=r, world_size=world)) for r in range(world)]
    lengths = {len(x) for x in per_rank}
    assert lengths == {4}  # ceil(10 / 3): every rank runs the same number of steps
    assert all(len(PKSampler(labels, p=4, k=2, batches_per_epoch=10, rank=r, world_size=world)) == 4 for r in range(world))
    single = list(PKSampler(labels, p=4, k=2, batches_per_epoch=12, seed=5))
    interleaved = [per_rank[r][step] for step in range(4) for r in range(world)]
    assert interleaved == single
    as_tuples = [tuple(b) for x in per_rank for b in x]
    assert len(set(as_tuples)) == len(as_tuples)
    # Within one step the ranks see different identities: consecutive batches walk one shuffled
    # identity cycle (40 ids / P=4 = 10 batches), so steps 0-2 (global batches 0-8) lie in one cycle.
    for step in range(3):
        ids = [{int(labels[i]) for i in per_rank[r][step]} for r in range(world)]
        assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])


def test_works_as_a_dataloader_batch_sampler():
    labels = _labels([4] * 6)
    ds = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=PKSampler(labels, p=3, k=2, seed=0))
    for idx, lab in loader:
        assert idx.shape == (6,)
        assert torch.equal(lab, torch.as_tensor(labels)[idx])


def test_bad_arguments_are_clear():
    labels = _labels([5, 5, 1])
    with pytest.raises(ValueError, match="only 2 identities"):
        PKSampler(labels, p=3, k=2)
    with pytest.raises(ValueError, match="rank"):
        PKSampler(labels, p=2, k=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="p >= 1"):
        PKSampler(labels, p=0, k=2)
