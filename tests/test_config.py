"""Every config rule fires when a config loads, with a message naming the key and the fix.

Unknown keys, wrong types and one-line CLI errors are tested in tests/cli.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from iwm.config import (
    Config,
    DataConfig,
    MaskConfig,
    TrainConfig,
    ViewsConfig,
    load_config,
    preset_description,
    preset_names,
)
from iwm.errors import ConfigError

# (overrides, what the message must say). The message starts with the key and its value;
# the rest says what is needed.
RULES = [
    # data
    ("data.image_size=0", "data.image_size=0: must be at least 1"),
    ("data.crop_scale=[0.5,0.2]", "data.crop_scale=[0.5, 0.2]: needs 0 < min <= max <= 1"),
    ("data.crop_ratio=[0,1]", "data.crop_ratio=[0.0, 1.0]: needs 0 < min <= max"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("data.holdout=1.0", "data.holdout=1.0: needs 0 <= value < 1"),
    ("data.holdout=-0.1", "data.holdout=-0.1: needs 0 <= value < 1"),
    # views
    ("views.strength=extreme",
     "views.strength='extreme': must be one of none, jitter, destructive, strong"),
    ("views.pairing=paired",
     "views.pairing='paired': must be one of relative, independent"),
    ("views.jitter_p=1.5", "views.jitter_p=1.5: a probability must be in [0, 1]"),
    ("views.grayscale_p=-0.1", "views.grayscale_p=-0.1: a probability must be in [0, 1]"),
    ("views.blur_p=1.5", "views.blur_p=1.5: a probability must be in [0, 1]"),
    ("views.solarize_p=2", "views.solarize_p=2.0: a probability must be in [0, 1]"),
    ("views.brightness=-0.1", "views.brightness=-0.1: a jitter strength must be >= 0"),
    ("views.contrast=-1", "views.contrast=-1.0: a jitter strength must be >= 0"),
    ("views.saturation=.nan", "views.saturation=nan: a jitter strength must be >= 0"),
    ("views.hue=-0.1", "views.hue=-0.1: a jitter strength must be >= 0"),
    ("views.hue=0.6", "views.hue=0.6: hue shifts are in turns, needs <= 0.5"),
    ("views.blur_sigma=[2.0,1.0]", "views.blur_sigma=[2.0, 1.0]: needs [min, max] with 0 < min"),
    ("views.blur_sigma=[0,1]", "views.blur_sigma=[0.0, 1.0]: needs [min, max] with 0 < min"),
    # mask
    ("mask.num_targets=0", "mask.num_targets=0: must be at least 1"),
    ("mask.target_scale=[0.1,1.5]", "mask.target_scale=[0.1, 1.5]: needs 0 < min <= max <= 1"),
    ("mask.context_scale=[0,1]", "mask.context_scale=[0.0, 1.0]: needs 0 < min <= max <= 1"),
    ("mask.target_aspect=[2,1]", "mask.target_aspect=[2.0, 1.0]: needs 0 < min <= max"),
    ("mask.min_context=1.0", "mask.min_context=1.0: needs 0 <= value < 1"),
    ("mask.block_sizes=per_sample",
     "mask.block_sizes='per_sample': must be one of per_block, per_batch"),
    ("mask.context_tokens=crop", "mask.context_tokens='crop': must be one of pad, thin"),
    ("mask.predictor_pass=all", "mask.predictor_pass='all': must be one of union, per_block"),
    # model
    ("model.encoder=vit_gigantic", "model.encoder='vit_gigantic': must be one of vit_micro, "),
    ("model.conditioning=film",
     "model.conditioning='film': must be one of none, sequence, feature, adaln"),
    ("model.loss=l1", "model.loss='l1': must be one of l2, smooth_l1"),
    ("model.patch_size=0", "model.patch_size=0: must be at least 1"),
    ("model.predictor_depth=0", "model.predictor_depth=0: must be at least 1"),
    ("model.predictor_width=0", "model.predictor_width=0: must be at least 1"),
    ("model.predictor_heads=0", "model.predictor_heads=0: must be at least 1"),
    ("model.predictor_heads=3",
     "model.predictor_width=128 is not divisible by model.predictor_heads=3"),
    ("model.predictor_width=6 model.predictor_heads=6",
     "model.predictor_width=6: needs a multiple of 4"),
    ("model.drop_path=1.0", "model.drop_path=1.0: needs 0 <= value < 1"),
    ("model.patch_size=5",
     "model.patch_size=5 does not divide data.image_size=28: choose sizes with"),
    # optim
    ("optim.lr=-1e-3", "optim.lr=-0.001: must be positive"),
    ("optim.predictor_lr_scale=0", "optim.predictor_lr_scale=0.0: must be positive"),
    ("optim.start_lr=-1", "optim.start_lr=-1.0: must be >= 0"),
    ("optim.final_lr=-1", "optim.final_lr=-1.0: must be >= 0"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1.0: must be >= 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("optim.final_weight_decay=-0.1", "optim.final_weight_decay=-0.1: must be >= 0"),
    ("optim.ema=[0.99,1.5]", "optim.ema=[0.99, 1.5]: momenta need 0 <= value <= 1"),
    ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0]: each needs 0 <= beta < 1"),
    ("optim.grad_clip=0", "optim.grad_clip=0.0: must be positive, or null for no clipping"),
    # train
    ("train.epochs=0", "train.epochs=0.0: must be positive"),
    ("train.batch_size=0", "train.batch_size=0: must be at least 1"),
    ("train.log_every=0", "train.log_every=0: must be at least 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0: must be at least 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0: must be at least 1"),
    ("train.max_nonfinite=0", "train.max_nonfinite=0: must be at least 1"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps=0: must be at least 1"),
    ("train.batch_size=10 train.grad_accum_steps=4",
     "train.batch_size=10 (the global batch) cannot be split evenly over 1 process(es) x "
     "train.grad_accum_steps=4: use a multiple of 4"),
    ("train.precision=fp8", "train.precision='fp8': must be one of auto, fp32, bf16"),
    ("train.attention=flash", "train.attention='flash': must be one of auto, sdpa, matmul"),
    ("train.data_parallel=zero", "train.data_parallel='zero': must be one of ddp, fsdp"),
    # probe
    ("probe.encoder=student", "probe.encoder='student': must be one of target, context"),
    ("probe.batch_size=0", "probe.batch_size=0: must be at least 1"),
    ("probe.max_iter=0", "probe.max_iter=0: must be at least 1"),
    ("probe.knn_k=0", "probe.knn_k=0: must be positive"),
    ("probe.knn_temperature=0", "probe.knn_temperature=0.0: must be positive"),
    ("probe.attentive_epochs=0", "probe.attentive_epochs=0.0: must be positive"),
    ("probe.attentive_lr=0", "probe.attentive_lr=0.0: must be positive"),
    ("probe.attentive_batch_size=0", "probe.attentive_batch_size=0: must be positive"),
    ("probe.attentive_heads=0", "probe.attentive_heads=0: must be positive"),
    # finetune
    ("finetune.epochs=0", "finetune.epochs=0.0: must be positive"),
    ("finetune.lr=0", "finetune.lr=0.0: must be positive"),
    ("finetune.batch_size=0", "finetune.batch_size=0: must be at least 1"),
    ("finetune.seg_classes=4", "finetune.seg_classes=4: must be one of 2, 3"),
    ("finetune.seg_threshold=1.0", "finetune.seg_threshold=1.0: needs 0 <= value < 1"),
    ("finetune.crop_scale=[0,1]", "finetune.crop_scale=[0.0, 1.0]: needs 0 < min <= max <= 1"),
    ("finetune.crop_ratio=[2,1]", "finetune.crop_ratio=[2.0, 1.0]: needs 0 < min <= max"),
    ("finetune.eval_points=0", "finetune.eval_points=0: must be at least 1"),
    ("finetune.label_smoothing=1", "finetune.label_smoothing=1.0: needs 0 <= value < 1"),
    ("finetune.layer_decay=0", "finetune.layer_decay=0.0: needs 0 < value <= 1"),
    ("finetune.layer_decay=1.5", "finetune.layer_decay=1.5: needs 0 < value <= 1"),
    ("finetune.head=mlp", "finetune.head='mlp': must be one of attentive, linear"),
    ("finetune.head_init=lbfgs", "finetune.head_init='lbfgs': must be one of random, probe"),
    # decoder
    ("decoder.width=0", "decoder.width=0: must be at least 1"),
    ("decoder.epochs=0", "decoder.epochs=0.0: must be positive"),
    ("decoder.lr=0", "decoder.lr=0.0: must be positive"),
    ("decoder.l1_weight=-1", "decoder.l1_weight=-1.0: must be >= 0"),
    ("decoder.warmup=1", "decoder.warmup=1.0: needs 0 <= value < 1"),
    ("decoder.jitter_p=1.5", "decoder.jitter_p=1.5: a probability must be in [0, 1]"),
    ("decoder.width=100 decoder.heads=3",
     "decoder.width=100 is not divisible by decoder.heads=3"),
    ("decoder.crop_scale=[0,1]", "decoder.crop_scale=[0.0, 1.0]: needs 0 < min <= max <= 1"),
]


@pytest.mark.parametrize("overrides, message", RULES, ids=[r[0] for r in RULES])
def test_every_rule_fails_the_load_naming_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("iwm-inv-tiny", overrides.split())


def test_every_choice_field_has_a_rule_case():
    # Choice fields are the Literal-typed ones; a new one must get a case above.
    tested = {r[0].split("=")[0] for r in RULES}
    for key, section in typing.get_type_hints(Config).items():
        for name, hint in typing.get_type_hints(section).items():
            if typing.get_origin(hint) is typing.Literal:
                assert f"{key}.{name}" in tested


def test_a_typo_in_a_choice_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'jitter'"):
        load_config({}, ["views.strength=jiter"])


@pytest.mark.parametrize("override, message", [
    ("views.strength=3", "views.strength=3: expected a string"),
    ("finetune.seg_classes=2.0", "finetune.seg_classes=2.0: expected an integer"),
    ("finetune.seg_classes=true", "finetune.seg_classes=True: expected an integer"),
])
def test_choice_values_keep_their_type(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config({}, [override])


def test_sections_built_in_code_are_checked_too():
    with pytest.raises(ConfigError, match="mask.num_targets=0"):
        MaskConfig(num_targets=0)
    with pytest.raises(ConfigError, match="views.blur_p=1.5"):
        ViewsConfig(blur_p=1.5)
    with pytest.raises(ConfigError, match="data.num_workers=-1"):
        dataclasses.replace(DataConfig(), num_workers=-1)
    with pytest.raises(ConfigError, match="model.patch_size=5 does not divide"):
        Config(model=dataclasses.replace(Config().model, patch_size=5))


def test_a_section_changed_in_place_is_checked_again_on_request():
    train = TrainConfig()
    train.batch_size = 0
    with pytest.raises(ConfigError, match="train.batch_size=0"):
        train.check()


def test_the_batch_split_counts_processes_and_micro_batches():
    train = load_config({}, ["train.batch_size=24", "train.grad_accum_steps=2"]).train
    train.check_batch_split(3)
    with pytest.raises(ConfigError, match=r"over 5 process\(es\) \(a launch\) x "
                                          r"train.grad_accum_steps=2: use a multiple of 10"):
        train.check_batch_split(5, " (a launch)")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(name):
    assert load_config(name).to_dict()["data"]


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_says_what_it_is_in_one_sentence(name):
    text = preset_description(name)
    # A whole sentence, and only the first: `iwm config` gives each preset one line.
    assert text.endswith(".") and ". " not in text and 20 < len(text) < 300


def test_preset_description_is_the_leading_comments_first_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr("iwm.config.PRESET_DIR", tmp_path)
    (tmp_path / "p.yaml").write_text("# A thing on two\n#  lines. Then more.\n# Even more.\n"
                                     "data: {image_size: 28}  # not this\n")
    assert preset_description("p") == "A thing on two lines."


def test_no_source_gives_the_defaults():
    assert load_config() == Config()


def test_exponent_without_a_dot_is_a_number():
    # PyYAML reads 1e-3 as a string; refusing it as "not a number" would be a trap.
    assert load_config("iwm-inv-tiny", ["optim.lr=1e-3"]).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="expected a number"):
        load_config("iwm-inv-tiny", ["optim.lr=fast"])


@pytest.mark.parametrize(("value", "expected"), [
    ("wandb", ("wandb",)), ("[tensorboard,wandb]", ("tensorboard", "wandb")), ("[]", ())])
def test_train_logger_takes_one_name_or_a_list(value: str, expected: tuple[str, ...]) -> None:
    cfg = load_config("iwm-inv-tiny", [f"train.logger={value}"])
    assert cfg.train.logger == expected
    assert load_config(cfg.to_dict()).train.logger == expected  # as config.yaml reads back


@pytest.mark.parametrize(("value", "message"), [
    ("csv", r"train.logger: 'csv' is not one of tensorboard, wandb \(metrics.csv is always"),
    ("wandbb", r"did you mean 'wandb'"),
    ("[wandb,wandb]", r"names a logger twice"),
    ("[3]", r"train.logger\[0\]=3: expected a string")])
def test_train_logger_refuses_what_it_cannot_log_to(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("iwm-inv-tiny", [f"train.logger={value}"])
