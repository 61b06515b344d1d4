"""`iwm import-ijepa`: a checkpoint in the official I-JEPA format becomes an iwm run whose
encoder and predictor compute what the official modules compute, and which the
evaluations, exports and ``model.init_from`` take like any run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import iwm
from conftest import write_image
from iwm.cli.main import main
from iwm.config import load_config
from iwm.errors import CheckpointError, ConfigError, IWMError
from iwm.interop.ijepa import IMAGENET_MEAN, IMAGENET_STD, import_ijepa
from iwm.training.step import Trainer

# vit_micro (128 wide, 6 deep, 4 heads) at 16 px, patch 4 (a 4 x 4 grid); predictor 2 x 32.
WIDTH, DEPTH, HEADS, PATCH, SIZE = 128, 6, 4, 4, 16
PRED_WIDTH, PRED_DEPTH = 32, 2
GRID = SIZE // PATCH
EPS = 1e-6  # the official code's LayerNorm eps


def official_sincos(dim: int, side: int) -> Tensor:
    """The official 2-D sin-cos positions, written from its formula: the first half of the
    channels encodes the column, the second the row, each as [sin | cos]."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=float) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(side, dtype=float), np.arange(side, dtype=float),
                             indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([encode(cols), encode(rows)], axis=1)).float()


def _block(gen: torch.Generator, prefix: str, dim: int) -> dict[str, Tensor]:
    def r(*shape: int, scale: float = 0.1) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    return {
        f"{prefix}norm1.weight": 1 + r(dim), f"{prefix}norm1.bias": r(dim),
        f"{prefix}attn.qkv.weight": r(3 * dim, dim), f"{prefix}attn.qkv.bias": r(3 * dim),
        f"{prefix}attn.proj.weight": r(dim, dim), f"{prefix}attn.proj.bias": r(dim),
        f"{prefix}norm2.weight": 1 + r(dim), f"{prefix}norm2.bias": r(dim),
        f"{prefix}mlp.fc1.weight": r(4 * dim, dim), f"{prefix}mlp.fc1.bias": r(4 * dim),
        f"{prefix}mlp.fc2.weight": r(dim, 4 * dim), f"{prefix}mlp.fc2.bias": r(dim),
    }


def official_encoder(seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {"patch_embed.proj.weight": torch.randn(WIDTH, 3, PATCH, PATCH, generator=gen) * 0.1,
          "patch_embed.proj.bias": torch.randn(WIDTH, generator=gen) * 0.1,
          "pos_embed": official_sincos(WIDTH, GRID).unsqueeze(0)}
    for i in range(DEPTH):
        sd.update(_block(gen, f"blocks.{i}.", WIDTH))
    sd["norm.weight"] = 1 + torch.randn(WIDTH, generator=gen) * 0.1
    sd["norm.bias"] = torch.randn(WIDTH, generator=gen) * 0.1
    return sd


def official_predictor(seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {"predictor_embed.weight": torch.randn(PRED_WIDTH, WIDTH, generator=gen) * 0.1,
          "predictor_embed.bias": torch.randn(PRED_WIDTH, generator=gen) * 0.1,
          "mask_token": torch.randn(1, 1, PRED_WIDTH, generator=gen) * 0.1,
          "predictor_pos_embed": official_sincos(PRED_WIDTH, GRID).unsqueeze(0)}
    for i in range(PRED_DEPTH):
        sd.update(_block(gen, f"predictor_blocks.{i}.", PRED_WIDTH))
    sd.update({"predictor_norm.weight": 1 + torch.randn(PRED_WIDTH, generator=gen) * 0.1,
               "predictor_norm.bias": torch.randn(PRED_WIDTH, generator=gen) * 0.1,
               "predictor_proj.weight": torch.randn(WIDTH, PRED_WIDTH, generator=gen) * 0.1,
               "predictor_proj.bias": torch.randn(WIDTH, generator=gen) * 0.1})
    return sd


def ddp(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"module.{k}": v for k, v in sd.items()}


def official_checkpoint(**replace: object) -> dict[str, object]:
    """The dict the official training loop saves, its models DDP-wrapped."""
    state: dict[str, object] = {
        "encoder": ddp(official_encoder(0)), "predictor": ddp(official_predictor(1)),
        "target_encoder": ddp(official_encoder(2)),
        "opt": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "scaler": None, "epoch": 300, "loss": 0.12, "batch_size": 2048, "world_size": 16,
        "lr": 1e-3,
    }
    state.update(replace)
    return state


def save(tmp_path: Path, state: object, name: str = "ijepa.pth.tar") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


# ---- the official forward passes, written from the official layout


def ref_block(sd: dict[str, Tensor], p: str, x: Tensor, heads: int) -> Tensor:
    b, n, c = x.shape
    h = F.layer_norm(x, (c,), sd[f"{p}norm1.weight"], sd[f"{p}norm1.bias"], EPS)
    qkv = F.linear(h, sd[f"{p}attn.qkv.weight"], sd[f"{p}attn.qkv.bias"])
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
    y = F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[f"{p}attn.proj.weight"],
                 sd[f"{p}attn.proj.bias"])
    x = x + y
    h = F.layer_norm(x, (c,), sd[f"{p}norm2.weight"], sd[f"{p}norm2.bias"], EPS)
    h = F.gelu(F.linear(h, sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc1.bias"]))
    return x + F.linear(h, sd[f"{p}mlp.fc2.weight"], sd[f"{p}mlp.fc2.bias"])


def ref_encoder(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    for i in range(DEPTH):
        x = ref_block(sd, f"blocks.{i}.", x, HEADS)
    return F.layer_norm(x, (WIDTH,), sd["norm.weight"], sd["norm.bias"], EPS)


def ref_predictor(sd: dict[str, Tensor], context: Tensor, ctx: Tensor, tgt: Tensor) -> Tensor:
    pos = sd["predictor_pos_embed"][0]
    x = F.linear(context, sd["predictor_embed.weight"], sd["predictor_embed.bias"]) + pos[ctx]
    queries = sd["mask_token"] + pos[tgt]
    x = torch.cat([x, queries], dim=1)
    for i in range(PRED_DEPTH):
        # I-JEPA's predictor has its encoder's number of heads.
        x = ref_block(sd, f"predictor_blocks.{i}.", x, HEADS)
    x = F.layer_norm(x, (PRED_WIDTH,), sd["predictor_norm.weight"], sd["predictor_norm.bias"],
                     EPS)[:, ctx.shape[1]:]
    return F.linear(x, sd["predictor_proj.weight"], sd["predictor_proj.bias"])


# ---- fixtures


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory) -> Path:
    """``train/`` and ``test/`` with two classes of 16 x 16 RGB images."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        for c, cls in enumerate(("red", "blue")):
            for i in range(n):
                image = rng.integers(0, 80, (SIZE, SIZE, 3), dtype=np.uint8)
                image[..., 2 * c] += 150
                write_image(root / split / cls / f"{i}.png", image)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, rgb_folder) -> Path:
    folder = tmp_path_factory.mktemp("imported")
    ckpt = save(folder, official_checkpoint())
    assert main(["import-ijepa", str(ckpt), "--out", str(folder / "run"),
                 f"data.name=imagefolder:{rgb_folder}", "data.num_workers=0"]) == 0
    return folder / "run"


# ---- the mapping


def test_the_run_config_comes_from_the_shapes(run):
    cfg = iwm.load(run).config
    m = cfg.model
    assert (m.encoder, m.patch_size, cfg.data.image_size) == ("vit_micro", PATCH, SIZE)
    assert (m.predictor_depth, m.predictor_width, m.predictor_heads) == (PRED_DEPTH,
                                                                         PRED_WIDTH, HEADS)
    assert m.conditioning == "none"
    assert load_config(run).to_dict() == cfg.to_dict()  # config.yaml says the same


def test_every_encoder_tensor_lands_under_its_name_bit_equal(run):
    model = iwm.load(run).model
    for ours, official in ((model.encoder, official_encoder(0)),
                           (model.target_encoder, official_encoder(2))):
        state = ours.state_dict()
        assert set(state) == set(official)
        for key, value in official.items():
            assert torch.equal(state[key], value), key


def test_the_encoders_compute_the_official_forward(run):
    model = iwm.load(run)
    x = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        for ours, official in ((model.encoder, official_encoder(2)),
                               (model.context_encoder, official_encoder(0))):
            torch.testing.assert_close(ours.forward_tokens(x), ref_encoder(official, x),
                                       rtol=1e-5, atol=1e-5)
        # iwm.load's encode normalises with I-JEPA's ImageNet statistics first.
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        torch.testing.assert_close(model.encode(x), ref_encoder(official_encoder(2),
                                                                (x - mean) / std),
                                   rtol=1e-5, atol=1e-5)


def test_the_predictor_computes_the_official_forward(run):
    predictor = iwm.load(run).predictor
    gen = torch.Generator().manual_seed(3)
    context = torch.randn(2, 7, WIDTH, generator=gen)
    ctx = torch.stack([torch.randperm(GRID * GRID, generator=gen)[:7] for _ in range(2)])
    tgt = torch.stack([torch.randperm(GRID * GRID, generator=gen)[:5] for _ in range(2)])
    expected = ref_predictor(official_predictor(1), context, ctx, tgt)
    with torch.no_grad():
        # Not bit-equal: iwm's predictor LayerNorms use eps 1e-5, the official 1e-6.
        torch.testing.assert_close(predictor(context, ctx, tgt), expected,
                                   rtol=1e-4, atol=1e-4)


def test_the_run_probes_evaluates_and_exports(run, tmp_path):
    import timm

    assert main(["probe", str(run), "probe.max_iter=5"]) == 0
    assert main(["eval", "mrr", str(run), "--images", "4", "--bank", "4",
                 "--device", "cpu"]) == 0
    assert (run / "results" / "probe_linear.json").is_file()
    out = tmp_path / "timm"
    assert main(["export", str(run), "--format", "timm", "--out", str(out)]) == 0
    encoder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), ref_encoder(official_encoder(2), x).mean(1),
                                   rtol=1e-5, atol=1e-5)


# ---- starting a pretraining run from it


def test_init_from_starts_every_shared_tensor_from_the_run(run):
    source = iwm.load(run).model.state_dict()
    cfg = load_config(run, [f"model.init_from={run}", "model.conditioning=feature",
                            "train.batch_size=4", "train.device=cpu"])
    with pytest.warns(UserWarning, match=r"predictor.action_mlp start from random"):
        trainer = Trainer.create(cfg, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                 device=torch.device("cpu"), steps_per_epoch=2,
                                 init_state=source)
    state = trainer.model.state_dict()
    assert {k for k in state if k not in source} == {k for k in state if ".action_mlp." in k}
    for key, value in source.items():
        assert torch.equal(state[key], value), key


def test_pretrain_from_a_run_directory_with_init_from(run, tmp_path):
    out = tmp_path / "iwm"
    with pytest.warns(UserWarning, match="predictor.action_embed start from random"):
        assert main(["pretrain", str(run), "--run-dir", str(out), f"model.init_from={run}",
                     "model.conditioning=sequence", "train.batch_size=4", "train.epochs=0.5",
                     "train.device=cpu", "train.progress=false", "views.strength=jitter"]) == 0
    model = iwm.load(out)
    assert model.step == 2 and model.config.model.init_from == str(run)


def test_a_resumed_run_does_not_read_init_from_again(run, tmp_path):
    import shutil

    source, out = tmp_path / "source", tmp_path / "iwm"
    shutil.copytree(run, source)
    common = ["train.batch_size=4", "train.device=cpu", "train.progress=false"]
    assert main(["pretrain", str(source), "--run-dir", str(out), f"model.init_from={source}",
                 "train.epochs=0.25", *common]) == 0
    shutil.rmtree(source)  # the checkpoint of its own is what resuming needs
    assert main(["pretrain", str(out), "--resume", "train.epochs=0.5", *common]) == 0
    assert iwm.load(out).step == 2


def test_init_from_a_model_of_another_shape_is_one_line(run):
    cfg = load_config(run, [f"model.init_from={run}", "model.predictor_depth=3"])
    with pytest.raises(CheckpointError, match=r"^model.init_from=.*do not fit.*missing: "
                                              r"predictor.blocks.2"):
        Trainer.create(cfg, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       device=torch.device("cpu"), steps_per_epoch=2,
                       init_state=iwm.load(run).model.state_dict())


# ---- what is refused, in one line


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("state, match", [
    ([1, 2, 3], "holds a list, not a checkpoint dict"),
    (official_checkpoint(predictor=None), "'predictor' is not a state dict of tensors"),
    ({k: v for k, v in official_checkpoint().items() if k != "target_encoder"},
     "no 'target_encoder' entry"),
    (official_checkpoint(target_encoder=ddp({**official_encoder(2),
                                             "cls_token": torch.zeros(1, 1, WIDTH)})),
     "has a class token"),
    (official_checkpoint(target_encoder=ddp({**official_encoder(2),
                                             "pos_embed": torch.zeros(GRID ** 2, WIDTH)})),
     r"'target_encoder.pos_embed' has shape \(16, 128\), expected 3 dimensions"),
    (official_checkpoint(target_encoder=ddp({
        **official_encoder(2), "pos_embed": torch.zeros(1, GRID ** 2 + 1, WIDTH)})),
     "not .* of a square grid without class token"),
    (official_checkpoint(encoder=ddp({k: v for k, v in official_encoder(0).items()
                                      if k != "blocks.3.mlp.fc1.bias"})),
     "'encoder' has no 'blocks.3.mlp.fc1.bias'"),
    (official_checkpoint(predictor=ddp({**official_predictor(1),
                                        "predictor_pos_embed": torch.rand(1, 16, PRED_WIDTH)})),
     "not the fixed 2-D sin-cos embedding of a 4x4 grid"),
    (official_checkpoint(encoder=ddp({**official_encoder(0), "head.weight": torch.zeros(1)})),
     "'encoder' has keys iwm's model lacks: head.weight"),
])
def test_other_files_are_refused_in_one_line(tmp_path, state, match):
    with pytest.raises(CheckpointError, match=match) as error:
        import_ijepa(save(tmp_path, state), tmp_path / "run")
    assert _one_line(error).endswith("(facebookresearch/ijepa)")
    assert not (tmp_path / "run").exists()


def test_an_encoder_of_no_iwm_size_is_refused(tmp_path):
    narrow = {k: v[..., :64] if k == "pos_embed" else v for k, v in official_encoder(0).items()}
    narrow["patch_embed.proj.weight"] = narrow["patch_embed.proj.weight"][:64]
    with pytest.raises(CheckpointError, match="width 64 and depth 6, is none of iwm's"):
        import_ijepa(save(tmp_path, official_checkpoint(target_encoder=narrow)),
                     tmp_path / "run")


def test_a_file_that_is_not_a_torch_checkpoint_is_refused(tmp_path):
    path = tmp_path / "notes.pth.tar"
    path.write_text("not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt.*download it again") as e:
        import_ijepa(path, tmp_path / "run")
    _one_line(e)
    with pytest.raises(CheckpointError, match="not found"):
        import_ijepa(tmp_path / "missing.pth.tar", tmp_path / "run")


def test_overrides_may_not_change_what_the_checkpoint_fixes(tmp_path):
    path = save(tmp_path, official_checkpoint())
    with pytest.raises(ConfigError, match=r"^data.image_size=32: the checkpoint fixes it to 16"):
        import_ijepa(path, tmp_path / "run", ["data.image_size=32"])
    import_ijepa(path, tmp_path / "run", [f"model.patch_size={PATCH}"])  # the same: fine
    with pytest.raises(IWMError, match="already holds a run"):
        import_ijepa(path, tmp_path / "run")


def test_the_cli_says_what_it_imported(tmp_path, capsys):
    path = save(tmp_path, official_checkpoint())
    assert main(["import-ijepa", str(path), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"I-JEPA vit_micro/{PATCH} at {SIZE} px, predictor {PRED_DEPTH} x {PRED_WIDTH}" in out
    assert main(["import-ijepa", str(tmp_path / "nope.pth.tar"), "--out",
                 str(tmp_path / "run2")]) == 2
