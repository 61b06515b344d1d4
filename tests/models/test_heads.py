"""Task heads: shapes, what attentive pooling can and cannot depend on, per-token dense heads."""

import pytest
import torch

from iwm.models.heads import (
    AttentiveClassifier,
    AttentivePooler,
    LinearSegmentationHead,
    PooledLinearClassifier,
    full_precision_logits,
)


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


def test_the_logits_product_stays_float32_under_bf16_autocast():
    # What a probe-initialised head looks like on features of small spread: large weights
    # and a bias that cancels their mean. A bf16 product leaves noise instead of logits.
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 3)
    with torch.no_grad():
        linear.weight.copy_(300 * torch.randn(3, 16))
        linear.bias.copy_(-linear.weight.sum(1) * 0.5)
    x = 0.5 + 0.01 * torch.randn(4, 16)
    exact = linear(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = full_precision_logits(linear, x)
        rounded = linear(x)
    assert kept.dtype == torch.float32 and torch.equal(kept, exact)
    assert (rounded.float() - exact).abs().max() > 1.0  # what it guards against


@pytest.mark.parametrize("head_cls", [PooledLinearClassifier, AttentiveClassifier,
                                      LinearSegmentationHead])
def test_every_head_returns_float32_logits_under_autocast(head_cls):
    head = head_cls(16, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(torch.randn(2, 5, 16)).dtype == torch.float32
