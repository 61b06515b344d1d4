import math

import pytest
import torch

from iwm.evaluation.ranking import (
    chance_mrr_stderr,
    chance_reciprocal_rank,
    mean_reciprocal_rank,
    ranks_from_scores,
)


def harmonic(k: int) -> float:
    return sum(1.0 / r for r in range(1, k + 1))


# ---------------------------------------------------------------- mean_reciprocal_rank


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_oracle_prediction_has_rank_one(distance):
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(4, 8, 5, 6, generator=gen)
    true = torch.tensor([0, 3, 7, 5])
    pred = bank[torch.arange(4), true]
    rr = mean_reciprocal_rank(pred, bank, true, distance)
    assert rr.shape == (4,)
    torch.testing.assert_close(rr, torch.ones(4))


def test_rank_of_another_entry_computed_by_hand():
    # Cosine: unit-ish vectors at 0, 10, 20, 30, 40 degrees (norms differ: cosine ignores
    # them). Prediction = the 0-degree entry; true = 30 degrees: entries at 0, 10, 20 and 30
    # degrees are at least as close -> rank 4.
    angles = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0]).deg2rad()
    norms = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0])
    bank = torch.stack([angles.cos(), angles.sin()], -1) * norms[:, None]
    # Shuffle the entries so the rank cannot come from the storage order.
    perm = torch.tensor([3, 0, 4, 2, 1])
    bank = bank[perm].unsqueeze(0)
    pred = bank[0, 1].unsqueeze(0)  # perm[1] = 0 degrees
    true = torch.tensor([0])  # perm[0] = 30 degrees
    torch.testing.assert_close(mean_reciprocal_rank(pred, bank, true, "cosine"),
                               torch.tensor([0.25]))
    # The same entry as "true" in reverse: 40 degrees (perm[2]) is the farthest -> 1/5.
    torch.testing.assert_close(mean_reciprocal_rank(pred, bank, torch.tensor([2]), "cosine"),
                               torch.tensor([0.2]))

    # L2 on scalars 0..4 (shuffled), prediction 1.0, true = 3.0 (squared error 4):
    # 0 (1), 1 (0), 2 (1) and 3 (4) are at least as close, 4 (9) is not -> rank 4.
    values = torch.tensor([3.0, 0.0, 4.0, 2.0, 1.0]).view(1, 5, 1)
    rr = mean_reciprocal_rank(torch.tensor([[1.0]]), values, torch.tensor([0]), "l2")
    torch.testing.assert_close(rr, torch.tensor([0.25]))


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_ties_count_as_the_worst_rank(distance):
    gen = torch.Generator().manual_seed(1)
    # Every entry identical: a prediction equal to all of them must not get credit.
    entry = torch.randn(1, 1, 3, 4, generator=gen)
    bank = entry.expand(2, 6, 3, 4)
    rr = mean_reciprocal_rank(bank[:, 0], bank, torch.tensor([0, 5]), distance)
    torch.testing.assert_close(rr, torch.full((2,), 1 / 6))
    # A two-way tie at the top: rank 2 for either of the tied entries.
    bank = torch.randn(1, 5, 3, 4, generator=gen)
    bank[0, 3] = bank[0, 1]
    pred = bank[:, 1] + 1e-3
    for true in (1, 3):
        rr = mean_reciprocal_rank(pred, bank, torch.tensor([true]), distance)
        torch.testing.assert_close(rr, torch.tensor([0.5]))


def test_zero_or_nan_prediction_gets_the_worst_rank():
    bank = torch.randn(2, 7, 3, 4, generator=torch.Generator().manual_seed(2))
    true = torch.tensor([2, 6])
    rr = mean_reciprocal_rank(torch.zeros(2, 3, 4), bank, true, "cosine")
    torch.testing.assert_close(rr, torch.full((2,), 1 / 7))
    rr = mean_reciprocal_rank(torch.full((2, 3, 4), math.nan), bank, true, "l2")
    torch.testing.assert_close(rr, torch.full((2,), 1 / 7))


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_action_blind_prediction_averages_to_chance(distance):
    # A prediction that does not depend on which entry is true, averaged over every
    # possible true index, scores exactly H_K / K (without ties).
    k = 9
    gen = torch.Generator().manual_seed(3)
    bank = torch.randn(3, k, 4, 5, generator=gen)
    pred = torch.randn(3, 4, 5, generator=gen)
    rr = torch.stack([mean_reciprocal_rank(pred, bank, torch.full((3,), i), distance)
                      for i in range(k)])
    torch.testing.assert_close(rr.mean(0), torch.full((3,), harmonic(k) / k))


def test_padding_tokens_are_ignored():
    gen = torch.Generator().manual_seed(4)
    bank = torch.randn(2, 6, 5, 4, generator=gen)
    pred = torch.randn(2, 5, 4, generator=gen)
    valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    true = torch.tensor([1, 4])
    for distance in ("cosine", "l2"):
        base = mean_reciprocal_rank(pred, bank, true, distance, valid)
        moved = bank.clone()
        moved[0, :, 3:] = 100 * torch.randn(6, 2, 4, generator=gen)
        torch.testing.assert_close(mean_reciprocal_rank(pred, moved, true, distance, valid), base)


def test_rejects_unknown_distance_and_shape_mismatch():
    bank = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="distance"):
        mean_reciprocal_rank(bank[:, 0], bank, torch.zeros(2, dtype=torch.long), "manhattan")
    with pytest.raises(ValueError, match="does not match"):
        mean_reciprocal_rank(torch.zeros(2, 5), bank, torch.zeros(2, dtype=torch.long))


def test_chance_stderr_is_the_spread_of_random_ranks():
    # 1/rank for ranks uniform on 1..K, n images at a time: the MRRs' std over many draws.
    gen = torch.Generator().manual_seed(0)
    for k, n in ((64, 256), (16, 8)):
        ranks = torch.randint(1, k + 1, (4000, n), generator=gen).float()
        mrrs = (1 / ranks).mean(1)
        assert mrrs.mean().item() == pytest.approx(harmonic(k) / k, rel=0.01)
        assert chance_mrr_stderr(k, n) == pytest.approx(mrrs.std().item(), rel=0.05)
    assert chance_mrr_stderr(1, 10) == 0.0  # one entry: always rank 1
    with pytest.raises(ValueError, match="at least 1"):
        chance_mrr_stderr(64, 0)


def test_equivalent_entries_do_not_compete_with_the_truth():
    scores = torch.tensor([[0.9, 0.5, 0.95, 0.95, 0.1]])
    true = torch.tensor([1])
    assert ranks_from_scores(scores, true).tolist() == [4]
    # Entries 2 and 3 are the same answer as entry 1: only entry 0 beats it.
    same = torch.tensor([[False, True, True, True, False]])
    assert ranks_from_scores(scores, true, same).tolist() == [2]
    # A tie with a different answer still counts against the truth.
    scores = torch.tensor([[0.5, 0.5, 0.1]])
    same = torch.tensor([[False, True, False]])
    assert ranks_from_scores(scores, true, same).tolist() == [2]


def test_chance_reciprocal_rank_is_the_mean_over_uniform_ranks():
    entries = torch.tensor([1, 2, 5, 64])
    expected = torch.tensor([harmonic(n) / n for n in (1, 2, 5, 64)])
    torch.testing.assert_close(chance_reciprocal_rank(entries), expected)
