import typing

import pytest
import timm
import torch

from iwm.config import EncoderName
from iwm.errors import ConfigError
from iwm.models.tokens import gather_tokens, sincos_pos_embed
from iwm.models.vit import ENCODERS, create_encoder


def _encoder():
    torch.manual_seed(0)
    return create_encoder("vit_micro", img_size=28, patch_size=4, in_chans=1).eval()


def test_keep_all_tokens_equals_full_forward():
    enc = _encoder()
    x = torch.randn(2, 1, 28, 28)
    full = enc.forward_tokens(x)
    keep = torch.arange(49).expand(2, -1)
    assert full.shape == (2, 49, 128)
    torch.testing.assert_close(enc.forward_tokens(x, keep), full)


def test_masked_forward_only_sees_kept_patches():
    enc = _encoder()
    x = torch.randn(1, 1, 28, 28)
    keep = torch.tensor([[0, 1, 2, 3, 4, 5, 6]])  # the first patch row
    y = x.clone()
    y[..., 4:, :] = torch.randn_like(y[..., 4:, :])  # change everything outside row 0
    torch.testing.assert_close(enc.forward_tokens(x, keep), enc.forward_tokens(y, keep))
    assert not torch.allclose(enc.forward_tokens(x), enc.forward_tokens(y))


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_padded_context_gives_each_image_its_own_tokens(kernel):
    # Two images with contexts of 7 and 4 patches in one padded batch: each image's valid
    # tokens equal its own unpadded forward; the padding repeats the image's own patches.
    from iwm.models.attention import set_attention

    enc = _encoder()
    set_attention(enc, kernel)
    x = torch.randn(2, 1, 28, 28)
    keep = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 10, 11, 12]])
    valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    padded = enc.forward_tokens(x, keep, valid)
    torch.testing.assert_close(padded[0], enc.forward_tokens(x[:1], keep[:1])[0])
    alone = enc.forward_tokens(x[1:], keep[1:, :4])[0]
    torch.testing.assert_close(padded[1, :4], alone, atol=1e-5, rtol=1e-5)
    # Unmasked, the repeated patches would be attended to twice and change the result.
    assert (enc.forward_tokens(x, keep)[1, :4] - alone).abs().max() > 1e-4


def test_state_dict_loads_into_timm_with_identical_features():
    enc = _encoder()
    spec = ENCODERS["vit_micro"]
    ref = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, global_pool="avg",
                            class_token=False, fc_norm=False, img_size=28, patch_size=4,
                            in_chans=1, embed_dim=spec.embed_dim, depth=spec.depth,
                            num_heads=spec.num_heads).eval()
    ref.load_state_dict(enc.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(ref(x), enc(x))


def test_positions_are_fixed_and_distinct():
    enc = _encoder()
    assert not enc.pos_embed.requires_grad
    pe = sincos_pos_embed((7, 7), 128)
    assert pe.shape == (49, 128)
    dist = torch.cdist(pe, pe) + torch.eye(49) * 1e3
    assert dist.min() > 0.1  # every position is distinguishable


def test_gather_tokens_picks_rows():
    x = torch.arange(2 * 5 * 3).float().view(2, 5, 3)
    idx = torch.tensor([[4, 0], [1, 1]])
    out = gather_tokens(x, idx)
    assert torch.equal(out[0, 0], x[0, 4]) and torch.equal(out[1, 1], x[1, 1])


def test_the_table_describes_exactly_the_encoders_a_config_may_name():
    assert tuple(ENCODERS) == typing.get_args(EncoderName)
    # Their fixed 2-D sin-cos positions take the width in quarters.
    assert all(spec.embed_dim % 4 == 0 for spec in ENCODERS.values())


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="vit_tiny"):
        create_encoder("vit_gigantic", img_size=28, patch_size=4, in_chans=1)


def test_fingerprint_tells_encoders_of_one_architecture_apart():
    a = _encoder()  # seed 0
    copy = create_encoder("vit_micro", img_size=28, patch_size=4, in_chans=1)  # another seed
    assert copy.fingerprint() != a.fingerprint()
    copy.load_state_dict(a.state_dict())
    assert a.fingerprint() == copy.fingerprint() and len(a.fingerprint()) == 16
    with torch.no_grad():
        copy.norm.bias.add_(1e-6)  # one step of an EMA moves every weight a little
    assert copy.fingerprint() != a.fingerprint()
