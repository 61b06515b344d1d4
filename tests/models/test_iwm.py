import pytest
import torch

from iwm.config import load_config
from iwm.data.actions import ACTION_DIM
from iwm.data.masks import MultiBlockMaskSampler
from iwm.models.iwm import build_model


def _setup(conditioning="feature"):
    torch.manual_seed(0)
    cfg = load_config("iwm-inv-tiny", [f"model.conditioning={conditioning}",
                                       "model.predictor_depth=2"])
    model = build_model(cfg, in_chans=1)
    gen = torch.Generator().manual_seed(0)
    masks = MultiBlockMaskSampler(model.encoder.grid, cfg.mask)(4, gen)
    images = torch.randn(4, 1, 28, 28, generator=gen)
    action = torch.randn(4, ACTION_DIM, generator=gen)
    return model, images, action, masks


def test_loss_is_finite_and_only_online_parts_get_gradients():
    model, images, action, masks = _setup()
    out = model(images, images, action, masks)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.predictor.mask_token.grad.abs().sum() > 0
    assert out.pred_std > 0 and out.target_std > 0


def _ema_apart():
    """A model whose online encoder has moved away from its EMA target; the model and
    copies of the target's and the online encoder's parameters."""
    model, *_ = _setup()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    online = [p.clone() for p in model.encoder.parameters()]
    return model, before, online


def test_ema_update_is_a_lerp_towards_the_online_encoder():
    model, before, online = _ema_apart()
    model.update_target(0.9)
    for b, o, t in zip(before, online, model.target_encoder.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)


@pytest.mark.parametrize("apply", [True, False])
def test_ema_update_of_sharded_parameters(apply: bool):
    # FSDP's parameters are DTensors, which take a different route (see update_target):
    # the same update, and none after a skipped step. World size 1, replicated.
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_module, init_device_mesh

    model, before, online = _ema_apart()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        distribute_module(model.encoder, mesh)
        distribute_module(model.target_encoder, mesh)
        assert isinstance(next(model.target_encoder.parameters()), DTensor)
        model.update_target(0.9, torch.tensor(apply))
        after = [p.full_tensor() for p in model.target_encoder.parameters()]
    finally:
        dist.destroy_process_group()
    for b, o, t in zip(before, online, after, strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o if apply else b)


def test_loss_ignores_padding_tokens():
    model, images, action, masks = _setup()
    base = model(images, images, action, masks).loss
    # Change the indices of padding entries: the loss must not move.
    moved = masks.targets.clone()
    moved[~masks.target_valid] = 0
    masks.targets = moved
    torch.testing.assert_close(model(images, images, action, masks).loss, base)


@pytest.mark.parametrize("context_tokens", ["pad", "thin"])
def test_each_image_is_trained_on_its_whole_context(context_tokens):
    # The batch's loss is the target-weighted mean of each image's loss on its own, with
    # every context patch it drew: padding a shorter context must not change the image's
    # problem. Thinning to the batch's smallest context (the official code) fails this.
    import dataclasses

    torch.manual_seed(0)
    cfg = load_config("iwm-inv-tiny", ["model.predictor_depth=2"])
    cfg.mask = dataclasses.replace(cfg.mask, context_tokens=context_tokens)
    model = build_model(cfg, in_chans=1).eval()
    gen = torch.Generator().manual_seed(0)
    sampler = MultiBlockMaskSampler(model.encoder.grid, cfg.mask)
    boolean, targets = sampler.sample_boolean(8, gen)
    masks = sampler.to_masks(boolean, targets, gen)
    images = torch.randn(8, 1, 28, 28, generator=gen)
    action = torch.randn(8, ACTION_DIM, generator=gen)
    assert boolean.sum(1).min() < boolean.sum(1).max()  # contexts of several sizes
    batch = model(images, images, action, masks).loss
    losses, counts = [], []
    for i in range(8):
        own = boolean[i].nonzero().T  # every context patch the image drew
        whole = type(masks)(context=own, context_valid=torch.ones_like(own, dtype=torch.bool),
                            targets=masks.targets[i:i + 1],
                            target_valid=masks.target_valid[i:i + 1])
        losses.append(model(images[i:i + 1], images[i:i + 1], action[i:i + 1], whole).loss)
        counts.append(masks.target_valid[i].sum())
    counts = torch.stack(counts).float()
    expected = (torch.stack(losses) * counts).sum() / counts.sum()
    if context_tokens == "pad":
        torch.testing.assert_close(batch, expected, atol=1e-5, rtol=1e-5)
    else:
        assert (batch - expected).abs() > 1e-4


def test_overfits_one_fixed_batch():
    model, images, action, masks = _setup()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(40):
        loss = model(images, images, action, masks).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    assert min(losses[-5:]) < min(losses[:5])


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = load_config("iwm-inv-tiny", ["model.predictor_depth=2",
                                           f"model.grad_checkpointing={checkpointing}"])
        model = build_model(cfg, in_chans=1).train()
        assert model.encoder.grad_checkpointing is checkpointing
        assert model.predictor.grad_checkpointing is checkpointing
        assert model.target_encoder.grad_checkpointing is False  # no autograd there
        _, images, action, masks = _setup()
        model(images, images, action, masks).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_a_denominator_rescales_the_loss_of_a_part_of_a_batch():
    model, images, action, masks = _setup()
    own = model(images, images, action, masks).loss
    count = masks.target_valid.sum().float()
    torch.testing.assert_close(model(images, images, action, masks, count / 2).loss, 2 * own)
