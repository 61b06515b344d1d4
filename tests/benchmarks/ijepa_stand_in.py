"""A stand-in for the official I-JEPA code (not on PyPI, not reachable here): the modules
``benchmarks/vs_official_ijepa.py`` imports from a clone, with the signatures it calls."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

# The official modules the harness imports, with the signatures it calls: a patch-linear
# "encoder" and a linear "predictor" instead of ViTs, the collator drawing fixed blocks.
STAND_IN = {
    "helper.py": """
        import torch
        from torch import nn
        from src.masks.utils import apply_masks

        class Encoder(nn.Module):
            def __init__(self, patch, dim):
                super().__init__()
                self.patch, self.proj = patch, nn.Linear(3 * patch * patch, dim)
            def forward(self, x, masks=None):
                p = self.patch
                x = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3)
                x = self.proj(x.flatten(1, 2))
                return x if masks is None else apply_masks(x, masks)

        class Predictor(nn.Module):
            def __init__(self, dim):
                super().__init__()
                self.lin = nn.Linear(dim, dim)
            def forward(self, z, masks_enc, masks_pred):
                pooled = self.lin(z.mean(1, keepdim=True))
                return torch.cat([pooled.expand(-1, m.shape[1], -1) for m in masks_pred])

        def init_model(device, patch_size=16, model_name="vit_base", crop_size=224,
                       pred_depth=6, pred_emb_dim=384):
            return Encoder(patch_size, 8).to(device), Predictor(8).to(device)

        class _Sched:
            def step(self):
                return 0.0

        def init_opt(encoder, predictor, iterations_per_epoch, start_lr, ref_lr, warmup,
                     num_epochs, wd=1e-6, final_wd=1e-6, final_lr=0.0, use_bfloat16=False,
                     ipe_scale=1.25):
            params = [*encoder.parameters(), *predictor.parameters()]
            return torch.optim.AdamW(params, lr=ref_lr), None, _Sched(), _Sched()
    """,
    "masks/multiblock.py": """
        import torch

        class MaskCollator:
            def __init__(self, input_size, patch_size, enc_mask_scale, pred_mask_scale,
                         aspect_ratio, nenc, npred, min_keep, allow_overlap):
                self.n, self.npred = (input_size // patch_size) ** 2, npred
            def __call__(self, batch):
                b = len(batch)
                enc = [torch.arange(self.n // 2).expand(b, -1)]
                pred = [torch.arange(self.n // 2, self.n // 2 + 3).expand(b, -1)
                        for _ in range(self.npred)]
                return torch.utils.data.default_collate(batch), enc, pred
    """,
    "masks/utils.py": """
        import torch

        def apply_masks(x, masks):
            return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, x.size(-1)))
                              for m in masks])
    """,
    "utils/tensors.py": """
        import torch

        def repeat_interleave_batch(x, B, repeat):
            n = len(x) // B
            return torch.cat([torch.cat([x[i * B:(i + 1) * B]] * repeat) for i in range(n)])
    """,
    "utils/logging.py": """
        def grad_logger(named_params):
            return [float(p.grad.norm()) for _, p in named_params if p.grad is not None]
    """,
}


def write_stand_in(repo: Path) -> Path:
    """Write the stand-in as a clone's ``src/`` under ``repo``; ``repo``."""
    for rel, text in STAND_IN.items():
        path = repo / "src" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return repo


def forget_stand_in() -> None:
    """Drop its ``src.*`` modules, so that another clone imports afresh."""
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[name]
