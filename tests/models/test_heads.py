"""Task heads: shapes, what attentive pooling can and cannot depend on, per-token dense heads."""

import pytest
import torch

from iwm.models.heads import AttentiveClassifier, AttentivePooler, LinearSegmentationHead


@pytest.mark.parametrize("num_queries, depth", [(1, 1), (3, 2)])
def test_pooler_shapes(num_queries, depth):
    pooler = AttentivePooler(32, num_heads=4, num_queries=num_queries, depth=depth)
    assert pooler(torch.randn(5, 7, 32)).shape == (5, num_queries, 32)


def test_classifier_and_segmentation_shapes():
    tokens = torch.randn(3, 9, 16)
    assert AttentiveClassifier(16, 10, num_heads=2)(tokens).shape == (3, 10)
    assert LinearSegmentationHead(16, 5)(tokens).shape == (3, 9, 5)


def test_pooling_is_invariant_to_token_order():
    # The pooler adds no positions of its own: positional information must come from the
    # encoder's tokens, so permuting the tokens cannot change the pooled output.
    pooler = AttentivePooler(16, num_heads=2).eval()
    tokens = torch.randn(2, 6, 16)
    perm = torch.randperm(6)
    torch.testing.assert_close(pooler(tokens), pooler(tokens[:, perm]))


def test_samples_do_not_mix_and_every_parameter_learns():
    clf = AttentiveClassifier(16, 4, num_heads=2)
    tokens = torch.randn(3, 5, 16)
    out = clf(tokens)
    changed = tokens.clone()
    changed[1] += 1.0
    torch.testing.assert_close(clf(changed)[[0, 2]], out[[0, 2]])
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clf.parameters())


def test_segmentation_head_is_per_token():
    head = LinearSegmentationHead(8, 3)
    tokens = torch.randn(2, 4, 8)
    changed = tokens.clone()
    changed[:, 2] = torch.randn(2, 8)
    out, out_changed = head(tokens), head(changed)
    torch.testing.assert_close(out[:, [0, 1, 3]], out_changed[:, [0, 1, 3]])
    assert not torch.allclose(out[:, 2], out_changed[:, 2])


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        AttentivePooler(30, num_heads=4)
