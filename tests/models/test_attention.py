"""The two attention kernels compute the same thing; the trainer picks one per device."""

import pytest
import torch
from timm.models.vision_transformer import Attention

from iwm.config import load_config
from iwm.data.actions import ACTION_DIM
from iwm.data.masks import MultiBlockMaskSampler
from iwm.models.attention import resolve_attention, set_attention
from iwm.models.iwm import build_model
from iwm.training.step import Trainer


def _loss_and_grads(kernel, precision):
    torch.manual_seed(0)
    # Per-block sizes pad the target blocks, so the predictor's padding mask is exercised.
    cfg = load_config("iwm-inv-tiny", ["model.predictor_depth=2", "mask.block_sizes=per_block"])
    model = build_model(cfg, in_chans=1)
    depth = len(model.encoder.blocks)
    assert set_attention(model, kernel) == 2 * depth + 2  # encoder, target encoder, predictor
    gen = torch.Generator().manual_seed(0)
    masks = MultiBlockMaskSampler(model.encoder.grid, cfg.mask)(8, gen)
    assert not masks.target_valid.all()
    images = torch.randn(8, 1, 28, 28, generator=gen)
    action = torch.randn(8, ACTION_DIM, generator=gen)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        loss = model(images, images, action, masks).loss
    loss.backward()
    return loss.detach().float(), [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 3e-2)])
def test_kernels_give_the_same_loss_and_gradients(precision, tol):
    loss_a, grads_a = _loss_and_grads("sdpa", precision)
    loss_b, grads_b = _loss_and_grads("matmul", precision)
    torch.testing.assert_close(loss_a, loss_b, atol=tol, rtol=tol)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b, strict=True):
        # Relative to the gradient's scale: bf16 rounds the two kernels differently.
        assert (a.float() - b.float()).norm() <= tol * a.float().norm() + 1e-8


def test_auto_is_matmul_on_cpu_and_sdpa_on_accelerators():
    assert resolve_attention("auto", torch.device("cuda", 0)) == "sdpa"
    assert resolve_attention("auto", torch.device("mps")) == "sdpa"
    assert resolve_attention("auto", torch.device("cpu")) == "matmul"
    assert resolve_attention("sdpa", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="'flash'"):
        resolve_attention("flash", torch.device("cpu"))
    with pytest.raises(ValueError, match="'auto'"):
        set_attention(torch.nn.Linear(2, 2), "auto")


@pytest.mark.parametrize("setting, fused", [("auto", False), ("sdpa", True), ("matmul", False)])
def test_trainer_sets_every_attention_layer(setting, fused):
    cfg = load_config("ijepa-tiny", [f"train.attention={setting}", "train.device=cpu"])
    trainer = Trainer.create(cfg, channels=1, mean=(0.5,), std=(0.5,),
                             device=torch.device("cpu"), steps_per_epoch=10)
    layers = [m for m in trainer.model.modules() if isinstance(m, Attention)]
    assert layers and all(m.fused_attn is fused for m in layers)
