import pytest
import torch

from iwm.models.attention import KERNELS, set_attention
from iwm.models.predictor import Predictor

GRID = (4, 4)


def _predictor(conditioning):
    torch.manual_seed(0)
    return Predictor(grid=GRID, embed_dim=32, width=32, depth=2, num_heads=4, action_dim=5,
                     conditioning=conditioning).eval()


def _inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    context = torch.randn(batch, 6, 32, generator=g)
    ctx_idx = torch.tensor([[0, 1, 2, 4, 5, 6]]).expand(batch, -1)
    tgt_idx = torch.tensor([[10, 11, 14, 15]]).expand(batch, -1)
    return context, ctx_idx, tgt_idx


def test_output_shape():
    context, ctx_idx, tgt_idx = _inputs()
    out = _predictor("feature")(context, ctx_idx, tgt_idx, torch.zeros(2, 5))
    assert out.shape == (2, 4, 32)


def test_no_conditioning_ignores_the_action():
    p = _predictor("none")
    context, ctx_idx, tgt_idx = _inputs()
    a, b = p(context, ctx_idx, tgt_idx, torch.zeros(2, 5)), p(context, ctx_idx, tgt_idx,
                                                               torch.randn(2, 5))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("conditioning", ["sequence", "feature"])
def test_conditioning_uses_the_action(conditioning):
    p = _predictor(conditioning)
    context, ctx_idx, tgt_idx = _inputs()
    a = p(context, ctx_idx, tgt_idx, torch.zeros(2, 5))
    b = p(context, ctx_idx, tgt_idx, torch.ones(2, 5))
    assert (a - b).abs().max() > 1e-4
    # None means the null action (all zeros).
    torch.testing.assert_close(p(context, ctx_idx, tgt_idx, None), a)


@pytest.mark.parametrize("kernel", KERNELS)
def test_padding_tokens_do_not_change_real_predictions(kernel):
    p = _predictor("feature")
    assert set_attention(p, kernel) == 2
    context, ctx_idx, tgt_idx = _inputs(batch=1)
    action = torch.randn(1, 5)
    plain = p(context, ctx_idx, tgt_idx, action)
    padded_idx = torch.cat([tgt_idx, tgt_idx[:, :2]], dim=1)  # padding repeats real indices
    valid = torch.tensor([[True] * 4 + [False] * 2])
    padded = p(context, ctx_idx, padded_idx, action, valid)
    torch.testing.assert_close(padded[:, :4], plain, atol=1e-5, rtol=1e-5)
    # Without the mask the duplicates would be attended to and change the result.
    unmasked = p(context, ctx_idx, padded_idx, action)
    assert (unmasked[:, :4] - plain).abs().max() > 1e-5


def test_predictions_depend_on_target_position():
    p = _predictor("feature")
    context, ctx_idx, _ = _inputs(batch=1)
    out = p(context, ctx_idx, torch.tensor([[3, 12]]), torch.zeros(1, 5))
    assert (out[0, 0] - out[0, 1]).abs().max() > 1e-4
