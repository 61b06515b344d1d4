"""Finetuning protocols on a tiny pretrained run: what is frozen stays frozen, what is trained
changes, the predictor starts from the run's weights at 1/10 lr, heads see the right features,
a learnable task is learnt, a probe-initialised head starts at its probe, curves are
recorded (the run-level command: test_finetune_run.py)."""

from pathlib import Path

import pytest
import torch

import iwm
from iwm.config import load_config
from iwm.data.fetch import write_idx
from iwm.errors import ConfigError, DataError
from iwm.evaluation.finetune import (
    PROTOCOLS,
    build_backbone,
    build_head,
    count_trainable,
    evaluate,
    finetune,
    load_task,
    make_optimizer,
    match_channels,
)
from iwm.models.heads import AttentiveClassifier, PooledLinearClassifier
from tiny_run import make_tiny_run_with_mnist

# Two steps of 8 images per task and 8 test images: the plumbing, not the accuracy.
FT = ["finetune.epochs=1", "finetune.batch_size=8", "finetune.train_limit=16",
      "finetune.test_limit=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_tiny_run_with_mnist(tmp_path_factory.mktemp("ft"))


@pytest.fixture(autouse=True)
def data_env(run, monkeypatch):
    monkeypatch.setenv("IWM_DATA", str(run.parent / "fmnist"))


@pytest.fixture(scope="module")
def pretrained(run):
    return iwm.load(run)


@pytest.fixture
def cfg(pretrained):
    return load_config(pretrained.config.to_dict(), FT)


@pytest.fixture(scope="module")
def trained(run, pretrained):
    """One short finetuning per protocol, shared by the tests that inspect the result."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IWM_DATA", str(run.parent / "fmnist"))
        cfg = load_config(pretrained.config.to_dict(), FT)
        task = load_task("fashion-mnist", cfg, "classification")
        return {p: finetune(pretrained, p, cfg, [task]) for p in PROTOCOLS}


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def unchanged_trainable(after: torch.nn.Module, before: torch.nn.Module) -> list[str]:
    """The trainable parameters of ``after`` still equal to ``before``'s, bit for bit."""
    old = dict(before.named_parameters())
    return [n for n, p in after.named_parameters()
            if p.requires_grad and torch.equal(p.detach(), old[n].detach())]


def initial_backbone(pretrained, protocol, cfg):
    # finetune() seeds, then builds the backbone first: the same draw gives its start.
    torch.manual_seed(cfg.finetune.seed)
    return build_backbone(pretrained, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_frozen_parts_get_no_gradient_and_stay_unchanged(protocol, trained, pretrained, cfg):
    out = trained[protocol]
    start = initial_backbone(pretrained, protocol, cfg)
    # Every trained tensor moved (encoder, predictor, whichever the protocol trains).
    assert unchanged_trainable(out.backbone, start) == []
    assert out.backbone.pretrained_encoder is (protocol != "scratch")
    backbone = out.backbone
    encoder_frozen = protocol in ("random-predictor", "predictor")
    out.backbone.train()  # whatever the rest does, a frozen encoder stays in eval mode
    assert backbone.encoder.training is not encoder_frozen
    if encoder_frozen:
        assert all(not p.requires_grad and p.grad is None for p in backbone.encoder.parameters())
        assert same_state(backbone.encoder, pretrained.encoder)
        assert out.result["frozen"] == ["encoder"] and out.result["frozen_unchanged"]
    else:
        assert not same_state(backbone.encoder, pretrained.encoder)
        assert out.result["frozen"] == []
    if backbone.predictor is not None:
        assert all(p.requires_grad for p in backbone.predictor.parameters())
        assert not same_state(backbone.predictor, pretrained.predictor)
    # The run itself is never touched: finetuning works on copies.
    assert not any(p.requires_grad for p in pretrained.encoder.parameters())
    assert 0.0 <= out.result["accuracy"] <= 1.0
    assert out.result["steps"] == 2 and out.result["train_flops"] > 0
    assert out.result["flops_per_image"] * 16 == pytest.approx(out.result["train_flops"])


def test_scratch_is_the_encoder_protocol_at_random_init(trained, pretrained, cfg):
    start = initial_backbone(pretrained, "scratch", cfg)
    assert start.predictor is None and start.train_encoder
    # Same architecture as the encoder protocol, other weights (but the fixed positions).
    encoder = build_backbone(pretrained, "encoder").encoder
    assert start.encoder.state_dict().keys() == encoder.state_dict().keys()
    differ = [k for k, v in start.encoder.state_dict().items()
              if not torch.equal(v, encoder.state_dict()[k])]
    assert set(encoder.state_dict()) - set(differ) == {"pos_embed"}
    assert (trained["scratch"].result["trainable_params"]
            == trained["encoder"].result["trainable_params"])
    # Nothing pretrained to protect: the encoder at the base lr, whatever the scales say.
    head = torch.nn.ModuleList([AttentiveClassifier(pretrained.encoder.embed_dim, 10)])
    tuned = load_config(pretrained.config.to_dict(), [*FT, "finetune.layer_decay=0.5"])
    lrs = {g["name"]: g["lr"] for g in make_optimizer(start, head, tuned).param_groups}
    assert lrs == {"head": cfg.finetune.lr, "encoder": cfg.finetune.lr}


def test_finetuning_runs_the_configured_attention_kernel_on_copies(trained, pretrained):
    from timm.models.vision_transformer import Attention

    def kernels(module):
        return {m.fused_attn for m in module.modules() if isinstance(m, Attention)}

    # train.attention=auto on this CPU: matmul for the trained copies, as in pretraining;
    # the loaded run keeps timm's default.
    for protocol in PROTOCOLS:
        assert kernels(trained[protocol].backbone) == {False}
    assert kernels(pretrained.encoder) == {True}


def test_trainable_parameter_counts_are_ordered(pretrained):
    head = AttentiveClassifier(pretrained.encoder.embed_dim, 10)
    n = {p: count_trainable(build_backbone(pretrained, p), head) for p in PROTOCOLS}
    n_head = count_trainable(head)
    n_encoder = n["encoder"] - n_head
    n_predictor = n["predictor"] - n_head
    assert n["random-predictor"] == n["predictor"]  # same architecture
    assert n["predictor"] < n["end-to-end"] and n["encoder"] < n["end-to-end"]
    assert n["end-to-end"] == n_head + n_encoder + n_predictor
    # The fixed sin-cos positions stay frozen even when the encoder trains.
    assert n_encoder == count_trainable(pretrained.context_encoder)


def test_predictor_protocol_starts_from_the_run_at_a_tenth_of_the_lr(pretrained, cfg):
    head = torch.nn.ModuleList([AttentiveClassifier(pretrained.encoder.embed_dim, 10)])
    lr = cfg.finetune.lr

    def group_lrs(protocol):
        backbone = build_backbone(pretrained, protocol)
        return backbone, {g["name"]: g["lr"] for g in
                          make_optimizer(backbone, head, cfg).param_groups}

    backbone, lrs = group_lrs("predictor")
    assert same_state(backbone.predictor, pretrained.predictor)
    assert lrs == {"head": lr, "predictor": pytest.approx(0.1 * lr)}
    backbone, lrs = group_lrs("random-predictor")
    assert not same_state(backbone.predictor, pretrained.predictor)
    assert lrs == {"head": lr, "predictor": lr}
    _, lrs = group_lrs("end-to-end")
    assert lrs == {"head": lr, "predictor": pytest.approx(0.1 * lr),
                   "encoder": pytest.approx(cfg.finetune.encoder_lr_scale * lr)}


def test_layer_decay_scales_each_block_of_a_pretrained_encoder(pretrained):
    cfg = load_config(pretrained.config.to_dict(), ["finetune.layer_decay=0.5"])
    backbone = build_backbone(pretrained, "encoder")
    head = torch.nn.ModuleList([AttentiveClassifier(pretrained.encoder.embed_dim, 10)])
    groups = make_optimizer(backbone, head, cfg).param_groups
    lrs = {g["name"]: g["lr"] for g in groups}
    base = cfg.finetune.lr * cfg.finetune.encoder_lr_scale
    depth = len(backbone.encoder.blocks)
    expected = {f"encoder.layer{i + 1}": base * 0.5 ** (depth - i) for i in range(depth)}
    expected.update({"encoder.layer0": base * 0.5 ** (depth + 1),  # patch embedding
                     f"encoder.layer{depth + 1}": base})  # final norm
    assert lrs == {"head": cfg.finetune.lr, **{k: pytest.approx(v) for k, v in expected.items()}}
    block0 = {id(p) for p in backbone.encoder.blocks[0].parameters()}
    assert {id(p) for g in groups if g["name"] == "encoder.layer1" for p in g["params"]} == block0
    # Every trainable encoder tensor is in exactly one group.
    grouped = [id(p) for g in groups if g["name"].startswith("encoder") for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in backbone.encoder.parameters()
                                     if p.requires_grad)


def test_heads_and_label_smoothing_are_configurable(pretrained, cfg):
    dim = pretrained.encoder.embed_dim
    linear = load_config(pretrained.config.to_dict(), [*FT, "finetune.head=linear"])
    head = build_head("classification", linear, dim, 10)
    assert isinstance(head, PooledLinearClassifier)
    assert isinstance(build_head("classification", cfg, dim, 10), AttentiveClassifier)
    tokens = torch.randn(2, 5, dim)
    torch.testing.assert_close(head(tokens), head.linear(head.norm(tokens.mean(1))))
    task = load_task("fashion-mnist", cfg, "classification")
    out = finetune(pretrained, "encoder", linear, [task]).result
    assert out["head"] == "linear"
    # Same start and data: the first loss differs only by the smoothing term.
    smooth = load_config(pretrained.config.to_dict(), [*FT, "finetune.label_smoothing=0.5"])
    first = [finetune(pretrained, "encoder", c, [task]).result["curve"]["loss"][0]
             for c in (cfg, smooth)]
    assert first[0] != first[1]


def test_training_views_follow_the_finetuning_crop(pretrained, monkeypatch):
    # The run pretrained with ratios 3/4-4/3 and crops of 0.3-1; finetuning draws its own.
    import iwm.evaluation.finetune as ft_module
    seen = []

    def stop(data_cfg, *args, **kwargs):
        seen.append(data_cfg)
        raise RuntimeError("seen")

    monkeypatch.setattr(ft_module, "make_source", stop)
    task = None
    for overrides, scale, ratio in (([], (1.0, 1.0), (1.0, 1.0)),
                                    (["finetune.crop_scale=[0.5,1.0]",
                                      "finetune.crop_ratio=[0.75,1.25]"], (0.5, 1.0),
                                     (0.75, 1.25))):
        cfg = load_config(pretrained.config.to_dict(), [*FT, *overrides])
        task = task or load_task("fashion-mnist", cfg, "classification")
        with pytest.raises(RuntimeError, match="seen"):
            finetune(pretrained, "encoder", cfg, [task])
        assert (seen[-1].crop_scale, seen[-1].crop_ratio) == (scale, ratio)
    assert pretrained.config.data.crop_ratio != (1.0, 1.0)


def write_brightness_set(folder: Path, n_train: int = 256, n_test: int = 128) -> None:
    """MNIST-format files whose class (0-3 of 10) is the brightness of a noisy image: any
    working finetuning learns it whatever the crop and flip; chance is 1/4."""
    gen = torch.Generator().manual_seed(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 4, (n,), generator=gen)
        noise = torch.randint(-25, 26, (n, 28, 28), generator=gen)
        images = ((30 + 60 * labels).view(n, 1, 1) + noise).clamp(0, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images.to(torch.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))


@pytest.mark.parametrize("protocol", ["encoder", "scratch"])
def test_finetuning_learns_what_can_be_learnt_and_records_its_curve(protocol, pretrained,
                                                                   tmp_path, monkeypatch):
    write_brightness_set(tmp_path / "mnist")
    monkeypatch.setenv("IWM_DATA", str(tmp_path))  # a transfer task: the run is Fashion-MNIST
    cfg = load_config(pretrained.config.to_dict(), ["finetune.epochs=2", "finetune.batch_size=32",
                                                    "finetune.eval_points=3"])
    out = finetune(pretrained, protocol, cfg, [load_task("mnist", cfg, "classification")]).result
    assert out["accuracy"] >= 0.5  # chance 0.25
    curve = out["curve"]
    assert curve["eval_steps"] == [5, 11, 16] and out["steps"] == 16  # 8 steps an epoch
    assert curve["eval"]["mnist"][-1] == out["accuracy"] and len(curve["eval"]["mnist"]) == 3
    assert curve["loss_steps"] == list(range(1, 17))  # every step: fewer than 100 of them
    assert curve["loss"][-1] < curve["loss"][0]


@pytest.mark.parametrize("head", ["linear", "attentive"])
def test_a_probe_initialised_head_starts_where_the_probe_ends(head, pretrained, tmp_path,
                                                              monkeypatch):
    write_brightness_set(tmp_path / "mnist")
    monkeypatch.setenv("IWM_DATA", str(tmp_path))
    overrides = ["finetune.epochs=1", "finetune.batch_size=32", "finetune.eval_points=2",
                 f"finetune.head={head}", "finetune.head_init=probe"]
    cfg = load_config(pretrained.config.to_dict(), overrides)
    task = load_task("mnist", cfg, "classification")
    outcome = finetune(pretrained, "predictor", cfg, [task])
    out = outcome.result
    assert out["head_init"]["kind"] == "probe" and out["head_init"]["seconds"] > 0
    # The brightness classes are linearly separable in the features: the fitted head
    # starts far above chance (0.25), and the curve records that start at step 0.
    assert out["head_init"]["train_accuracy"]["mnist"] >= 0.9
    assert out["curve"]["eval_steps"] == [0, 4, 8]
    start = out["curve"]["eval"]["mnist"][0]
    assert start >= 0.9
    # The same head at random init starts near chance: the fit, not the data, did it.
    torch.manual_seed(0)
    fresh = build_head("classification", cfg, pretrained.encoder.embed_dim, 4)
    backbone = build_backbone(pretrained, "predictor")
    accuracy = evaluate(backbone, fresh.to(pretrained.device), task, None, "classification",
                        cfg, pretrained.normalize, 1, pretrained.device)["accuracy"]
    assert accuracy < start - 0.3


def test_probe_initialisation_is_for_classification(pretrained):
    cfg = load_config(pretrained.config.to_dict(), [*FT, "finetune.head_init=probe"])
    with pytest.raises(ConfigError, match="head_init=probe fits a classifier"):
        finetune(pretrained, "encoder", cfg, [load_task("fashion-mnist", cfg, "segmentation")],
                 kind="segmentation")
    with pytest.raises(ConfigError, match="head_init"):
        load_config(pretrained.config.to_dict(), ["finetune.head_init=lbfgs"])


def test_heads_see_target_encoder_tokens_or_null_action_predictions(pretrained):
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = pretrained.normalize(images)
    tokens = pretrained.encode(images)
    with torch.no_grad():
        assert torch.equal(build_backbone(pretrained, "encoder").eval()(x), tokens)
        expected = pretrained.predict(tokens)  # all positions, null action
        torch.testing.assert_close(build_backbone(pretrained, "predictor")(x), expected)
        # Task tokens start at zero: every task begins with the pretrained null-action output.
        multi = build_backbone(pretrained, "predictor", num_tasks=2)
        torch.testing.assert_close(multi(x, task=1), expected)


def test_multitask_learns_task_tokens_and_reports_each_task(pretrained, cfg):
    tasks = [load_task(n, cfg, "classification") for n in ("fashion-mnist", "mnist")]
    out = finetune(pretrained, "predictor", cfg, tasks)
    assert len(out.heads) == 2
    assert set(out.result["tasks"]) == {"fashion-mnist", "mnist"}
    assert all(0 <= r["accuracy"] <= 1 for r in out.result["tasks"].values())
    assert out.result["steps"] == 4  # each task keeps its own budget: 2 steps each
    tokens = out.backbone.task_tokens.weight
    assert tokens.shape == (2, iwm.data.actions.ACTION_DIM)
    assert tokens.abs().sum() > 0 and not torch.equal(tokens[0], tokens[1])
    with pytest.raises(ConfigError, match="predictor"):
        finetune(pretrained, "encoder", cfg, tasks)


def test_channel_conversion():
    gray = torch.rand(2, 1, 5, 5)
    assert torch.equal(match_channels(gray, 3), gray.expand(-1, 3, -1, -1))
    rgb = torch.rand(2, 3, 5, 5)
    luma = 0.2989 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(match_channels(rgb, 1)[:, 0], luma)
    assert match_channels(rgb, 3) is rgb


def test_classification_of_a_one_class_folder_says_it_needs_labels(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):  # indexing goes by extension: empty files are enough
        (photos / f"{i}.png").touch()
    cfg = load_config("iwm-inv-tiny")
    with pytest.raises(DataError, match="^classification finetuning needs labelled images"):
        load_task(f"imagefolder:{photos}", cfg, "classification")
    # Segmentation's labels come from the pixels: one class is fine.
    task = load_task(f"imagefolder:{photos}", cfg, "segmentation")
    assert len(task.train) + len(task.test) == 4
