"""torch.hub entry points for iwm encoders and world models.

    model = torch.hub.load("path/to/iwm", "iwm_vit_base", source="local", checkpoint=RUN)
    features = model.encode(images, pooled=True)

``checkpoint``: a run directory, checkpoint file or exported folder (anything
``iwm.load`` takes); the entry point checks that it holds that encoder size. Without it,
the entry point builds an UNTRAINED model of that size, randomly initialised and shaped
for ImageNet (3 x 224 x 224, patch 16, ImageNet normalisation). Every entry point returns
an ``iwm.Pretrained`` (``.encoder`` is a timm VisionTransformer; ``.encode``, ``.apply``,
``.retrieve``). See ``iwm.interop.hub``.
"""

import sys as _sys
from pathlib import Path as _Path

# A plain clone works without `pip install`: import iwm from this repository's src/.
_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

from iwm.interop.hub import hub_model as _hub_model  # noqa: E402

dependencies = ["torch", "torchvision", "timm", "kornia", "safetensors", "yaml", "numpy",
                "PIL"]


def iwm_vit_micro(checkpoint=None, device="cpu"):
    """ViT-micro (width 128, depth 6, 4 heads): the CPU-scale presets' encoder."""
    return _hub_model("vit_micro", checkpoint, device)


def iwm_vit_tiny(checkpoint=None, device="cpu"):
    """ViT-Ti (width 192, depth 12, 3 heads)."""
    return _hub_model("vit_tiny", checkpoint, device)


def iwm_vit_small(checkpoint=None, device="cpu"):
    """ViT-S (width 384, depth 12, 6 heads)."""
    return _hub_model("vit_small", checkpoint, device)


def iwm_vit_base(checkpoint=None, device="cpu"):
    """ViT-B (width 768, depth 12, 12 heads): the paper's encoder."""
    return _hub_model("vit_base", checkpoint, device)


def iwm_vit_large(checkpoint=None, device="cpu"):
    """ViT-L (width 1024, depth 24, 16 heads)."""
    return _hub_model("vit_large", checkpoint, device)


def iwm_vit_huge(checkpoint=None, device="cpu"):
    """ViT-H (width 1280, depth 32, 16 heads)."""
    return _hub_model("vit_huge", checkpoint, device)
