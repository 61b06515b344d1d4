"""Finetuning protocols on a tiny pretrained run: what is frozen stays frozen, the predictor
starts from the run's weights at 1/10 lr, heads see the right features, results are written."""

import json
from pathlib import Path

import pytest
import torch

import iwm
from iwm.cli.main import main
from iwm.config import load_config
from iwm.errors import ConfigError, DataError
from iwm.evaluation.finetune import (
    PROTOCOLS,
    build_backbone,
    count_trainable,
    finetune,
    load_task,
    make_optimizer,
    match_channels,
)
from iwm.models.heads import AttentiveClassifier
from tiny_run import make_tiny_run

# Two steps of 8 images per task and 8 test images: the plumbing, not the accuracy.
FT = ["finetune.epochs=1", "finetune.batch_size=8", "finetune.train_limit=16",
      "finetune.test_limit=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from conftest import write_fake_mnist

    run = make_tiny_run(tmp_path_factory.mktemp("ft"))
    # A second data set for multitask tuning: MNIST where find_mnist looks for it.
    write_fake_mnist(run.parent / "fmnist" / "mnist")
    return run


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


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_frozen_parts_get_no_gradient_and_stay_unchanged(protocol, trained, pretrained):
    out = trained[protocol]
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


def test_cli_writes_the_results(run, capsys):
    assert main(["finetune", str(run), "--protocol", "predictor", *FT]) == 0
    single = json.loads((run / "results" / "finetune_predictor.json").read_text())
    assert {"accuracy", "protocol", "trainable_params", "seconds", "epochs",
            "train_flops", "lr", "dataset"} <= single.keys()
    assert single["protocol"] == "predictor" and single["dataset"] == "fashion-mnist"

    assert main(["finetune", str(run), "--protocol", "predictor", "--tasks",
                 "fashion-mnist,mnist", "--compare-separate", *FT]) == 0
    multi = json.loads((run / "results" / "finetune_multitask.json").read_text())
    assert set(multi["tasks"]) == set(multi["separate"]["tasks"]) == {"fashion-mnist", "mnist"}
    # One shared predictor instead of two.
    assert multi["trainable_params"] < multi["separate"]["trainable_params"]
    assert "separate predictors" in capsys.readouterr().out

    assert main(["finetune", str(run), "--protocol", "random-predictor", "--task",
                 "segmentation", *FT]) == 0
    seg = json.loads((run / "results" / "segment_random-predictor.json").read_text())
    assert 0 <= seg["miou"] <= 1 and set(seg["per_class_iou"]) == {"background", "edge",
                                                                   "interior"}
    with pytest.raises(SystemExit):
        main(["finetune", str(run), "--protocol", "sideways"])


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
