"""The comparison with the official I-JEPA code: its harness, on a stand-in of that code.

The official code is not on PyPI and cannot be fetched here, so the harness runs against a
small stand-in with the same module layout and call signatures (written below); the
real comparison's figures are in docs/RESULTS.md. No timing assertions.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from scripts import load_script  # tests/benchmarks/scripts.py

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


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("vs_official_ijepa")


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[Path]:
    repo = tmp_path / "ijepa"
    for rel, text in STAND_IN.items():
        path = repo / "src" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    yield repo
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[name]


SMALL = ["--model", "vit_tiny", "--image-size", "40", "--patch-size", "4", "--batch-size",
         "4", "--pred-depth", "1", "--pred-width", "48", "--steps", "2", "--warmup", "1",
         "--rounds", "2", "--device", "cpu"]


def test_both_sides_are_timed_and_written(script, stand_in, tmp_path, capsys):
    out = tmp_path / "r.json"
    r = script.main(["--ijepa-repo", str(stand_in), *SMALL, "--json", str(out),
                     "--iwm-variant", "train.grad_accum_steps=2"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    names = {"official", "collator", "iwm", "iwm train.grad_accum_steps=2"}
    assert set(r["step_time_ms"]) == names
    for name in names:  # warm-up steps dropped: `steps` per round, `rounds` rounds
        assert len(r["step_time_ms_per_round"][name]) == 2
        assert r["step_time_ms"][name] > 0
    assert r["speedup"]["iwm"] == pytest.approx(r["images_per_s"]["iwm"]
                                                / r["images_per_s"]["official"])
    assert r["images_per_s"]["official_with_collator"] < r["images_per_s"]["official"]
    assert r["flops_per_image"]["iwm"] > r["flops_per_image"]["official"] > 0  # stand-in
    assert "official" in capsys.readouterr().out


def test_iwm_side_takes_the_official_recipe(script):
    args = script.parse_args(["--ijepa-repo", "x", "--model", "vit_small"])
    cfg = script.iwm_config(args, torch.device("cpu"))
    m, k, o = cfg.model, cfg.mask, cfg.optim
    assert (m.encoder, m.predictor_heads, m.loss, m.patch_size) == ("vit_small", 6,
                                                                   "smooth_l1", 8)
    assert (k.num_targets, k.target_scale, k.wrap, k.block_sizes) == (
        4, (0.15, 0.2), False, "per_batch")
    # The official context block is always 13 x 13 on the 14 x 14 grid: so is iwm's.
    assert k.context_scale[0] == 0.85 and 13.49 < k.context_scale[1] ** 0.5 * 14 < 13.5
    assert k.min_context * (112 // 8) ** 2 == pytest.approx(10)  # the official min_keep
    assert o.grad_clip is None and o.ema == (0.996, 1.0)


def test_a_folder_that_is_no_clone_is_a_one_line_error(script, tmp_path):
    with pytest.raises(SystemExit, match="no src/helper.py.*git clone"):
        script.main(["--ijepa-repo", str(tmp_path), *SMALL])


def test_grids_the_official_collator_cannot_fill_are_refused(script, capsys):
    # 8x8 patches: its smallest target block has 9 <= min_keep=10 patches, and the
    # official collator would redraw it forever.
    assert script.smallest_target_block(8) <= script.MIN_KEEP < script.smallest_target_block(14)
    with pytest.raises(SystemExit):
        script.parse_args(["--ijepa-repo", "x", "--image-size", "64", "--patch-size", "8"])
    assert "8x8 patch grid is too small" in capsys.readouterr().err


def test_bf16_on_cpu_is_refused(script, stand_in):
    with pytest.raises(SystemExit, match="CUDA-only"):
        script.main(["--ijepa-repo", str(stand_in), *SMALL, "--bf16"])
