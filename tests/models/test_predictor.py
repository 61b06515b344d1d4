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
    out = _predictor("feature")(context, ctx_idx, tgt_idx, action=torch.zeros(2, 5))
    assert out.shape == (2, 4, 32)


def test_no_conditioning_ignores_the_action():
    p = _predictor("none")
    context, ctx_idx, tgt_idx = _inputs()
    a = p(context, ctx_idx, tgt_idx, action=torch.zeros(2, 5))
    b = p(context, ctx_idx, tgt_idx, action=torch.randn(2, 5))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("conditioning", ["sequence", "feature"])
def test_conditioning_uses_the_action(conditioning):
    p = _predictor(conditioning)
    context, ctx_idx, tgt_idx = _inputs()
    a = p(context, ctx_idx, tgt_idx, action=torch.zeros(2, 5))
    b = p(context, ctx_idx, tgt_idx, action=torch.ones(2, 5))
    # Far above float32 rounding (~1e-7 here); feature conditioning starts small by design.
    assert (a - b).abs().max() > 1e-5
    # None means the null action (all zeros).
    torch.testing.assert_close(p(context, ctx_idx, tgt_idx), a)


@pytest.mark.parametrize("kernel", KERNELS)
def test_padding_tokens_do_not_change_real_predictions(kernel):
    p = _predictor("feature")
    assert set_attention(p, kernel) == 2
    context, ctx_idx, tgt_idx = _inputs(batch=1)
    action = torch.randn(1, 5)
    plain = p(context, ctx_idx, tgt_idx, action=action)
    padded_idx = torch.cat([tgt_idx, tgt_idx[:, :2]], dim=1)  # padding repeats real indices
    valid = torch.tensor([[True] * 4 + [False] * 2])
    padded = p(context, ctx_idx, padded_idx, target_valid=valid, action=action)
    torch.testing.assert_close(padded[:, :4], plain, atol=1e-5, rtol=1e-5)
    # Without the mask the duplicates would be attended to and change the result.
    unmasked = p(context, ctx_idx, padded_idx, action=action)
    assert (unmasked[:, :4] - plain).abs().max() > 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_context_padding_does_not_change_predictions(kernel):
    p = _predictor("feature")
    set_attention(p, kernel)
    context, ctx_idx, tgt_idx = _inputs(batch=1)
    action = torch.randn(1, 5)
    plain = p(context, ctx_idx, tgt_idx, action=action)
    padded_ctx = torch.cat([context, context[:, :3]], dim=1)
    padded_idx = torch.cat([ctx_idx, ctx_idx[:, :3]], dim=1)
    valid = torch.tensor([[True] * 6 + [False] * 3])
    padded = p(padded_ctx, padded_idx, tgt_idx, context_valid=valid, action=action)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
    assert (p(padded_ctx, padded_idx, tgt_idx, action=action) - plain).abs().max() > 1e-5


def test_feature_conditioning_keeps_the_query_position_at_initialisation():
    # The MLP over [mask token + position, action] starts near zero; the query entering
    # the first block must still be (mostly) its position embedding, not that output.
    p = _predictor("feature")
    context, ctx_idx, tgt_idx = _inputs(batch=1)
    seen = {}
    p.blocks[0].register_forward_pre_hook(lambda m, args, kw: seen.update(x=args[0]),
                                          with_kwargs=True)
    p(context, ctx_idx, tgt_idx, action=torch.randn(1, 5))
    queries = seen["x"][0, 6:]
    expected = p.mask_token[0] + p.pos_embed[tgt_idx[0]]
    cos = torch.nn.functional.cosine_similarity(queries, expected, dim=-1)
    assert (cos > 0.95).all()


def test_predictions_depend_on_target_position():
    p = _predictor("feature")
    context, ctx_idx, _ = _inputs(batch=1)
    out = p(context, ctx_idx, torch.tensor([[3, 12]]), action=torch.zeros(1, 5))
    assert (out[0, 0] - out[0, 1]).abs().max() > 1e-4


@pytest.mark.parametrize("tile", [1, 2, 3])
def test_predict_by_halves_predicts_each_square_from_the_other_colour(tile):
    p = _predictor("feature")
    tokens = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    action = torch.randn(2, 5)
    out = p.predict_by_halves(tokens, action=action, tile=tile)
    rows, cols = torch.arange(4) // tile, torch.arange(4) // tile
    black = ((rows[:, None] + cols[None, :]) % 2 == 0).flatten()
    for queries in (black, ~black):
        q, c = queries.nonzero().squeeze(1), (~queries).nonzero().squeeze(1)
        expected = p(tokens[:, c], c.expand(2, -1), q.expand(2, -1), action=action)
        torch.testing.assert_close(out[:, q], expected)


def test_predict_by_halves_with_one_square_is_predict_all():
    p = _predictor("feature")
    tokens = torch.randn(2, 16, 32)
    torch.testing.assert_close(p.predict_by_halves(tokens, tile=4), p.predict_all(tokens))


def test_adaln_starts_as_the_plain_predictor_and_learns_to_use_the_action():
    p = _predictor("adaln").train()
    context, ctx_idx, tgt_idx = _inputs()
    zero, one = torch.zeros(2, 5), torch.ones(2, 5)
    # Zero-initialised modulation: at first the action changes nothing.
    torch.testing.assert_close(p(context, ctx_idx, tgt_idx, action=zero),
                               p(context, ctx_idx, tgt_idx, action=one))
    opt = torch.optim.Adam(p.parameters(), lr=1e-2)  # Adam, as training: scale-free
    for _ in range(3):  # ask for different outputs under the two actions
        loss = (p(context, ctx_idx, tgt_idx, action=one) - 1).pow(2).mean() + \
            (p(context, ctx_idx, tgt_idx, action=zero) + 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    a = p(context, ctx_idx, tgt_idx, action=zero)
    b = p(context, ctx_idx, tgt_idx, action=one)
    assert (a - b).abs().max() > 1e-3
