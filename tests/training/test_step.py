"""The training step on the CPU: compile fallback, precision, learning-rate groups."""

import pytest
import torch

from iwm.config import load_config
from tiny_run import tiny_trainer


def test_a_failing_compile_falls_back_to_the_uncompiled_model(monkeypatch):
    import torch._dynamo.exc

    class CompileFailed(torch._dynamo.exc.TorchDynamoException):
        pass

    class Uncompilable(torch.nn.Module):
        # What torch.compile returns: the model as _orig_mod, compiled at the first call.
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, *args):
            raise CompileFailed("no C compiler for Triton\nmore detail")

    monkeypatch.setattr(torch, "compile", Uncompilable)
    crops = torch.rand(8, 1, 28, 28)
    plain = tiny_trainer("train.batch_size=8")
    fallback = tiny_trainer("train.batch_size=8", "train.compile=true")
    assert isinstance(fallback.train_model, Uncompilable)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(CompileFailed: no C "
                                            r"compiler for Triton\); training continues"):
        fallback.step(0, crops)
    assert fallback.train_model is fallback.model  # the rest of the run is uncompiled
    plain.step(0, crops)
    for a, b in zip(plain.model.parameters(), fallback.model.parameters(), strict=True):
        assert torch.equal(a, b)  # the same update as never compiling


def test_an_error_of_the_uncompiled_model_is_not_swallowed(monkeypatch):
    import torch._dynamo.exc

    trainer = tiny_trainer("train.batch_size=8")

    def broken(*args):
        raise torch._dynamo.exc.TorchDynamoException("a real error")

    monkeypatch.setattr(trainer, "train_model", broken)
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match="a real error"):
        trainer.step(0, torch.rand(8, 1, 28, 28))


@pytest.mark.parametrize(("device", "capability", "precision", "expected"), [
    ("cuda", (9, 0), "auto", torch.bfloat16),   # H100
    ("cuda", (8, 0), "auto", torch.bfloat16),   # A100
    ("cuda", (7, 0), "auto", None),             # V100: bf16 only emulated
    ("cpu", None, "auto", None),
    ("cpu", None, "bf16", torch.bfloat16),
    ("cuda", (7, 0), "fp32", None),
])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it(monkeypatch, device, capability,
                                                          precision, expected):
    from iwm.training.step import autocast_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    cfg = load_config("iwm-equi-tiny", [f"train.precision={precision}"])
    assert autocast_dtype(cfg, torch.device(device)) == expected


def test_compiled_steps_train_as_the_uncompiled_ones():
    # The real torch.compile (Dynamo + Inductor) of the tiny model: it must compile
    # without falling back, and train to what eager mode trains to. Mask sizes change
    # from step to step, so the second step exercises the recompile with dynamic shapes.
    import warnings

    crops = torch.rand(8, 1, 28, 28)
    eager = tiny_trainer("train.batch_size=8")
    compiled = tiny_trainer("train.batch_size=8", "train.compile=true")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile")
        for step in range(2):
            out_e, _ = eager.step(step, crops)
            out_c, _ = compiled.step(step, crops)
            torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-4, atol=1e-5)
    assert compiled.train_model is not compiled.model  # still the compiled module
    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_the_predictor_trains_at_its_own_lr_scale():
    trainer = tiny_trainer("optim.predictor_lr_scale=10")
    trainer.step(2, torch.rand(16, 1, 28, 28))
    lr = trainer.schedules.lr(2)
    predictor = {id(p) for p in trainer.model.predictor.parameters()}
    seen = set()
    for group in trainer.optimizer.param_groups:
        ours = {id(p) for p in group["params"]}
        seen.add(bool(ours & predictor))
        assert ours <= predictor or not ours & predictor  # a group is one network's
        assert group["lr"] == pytest.approx(lr * (10 if ours & predictor else 1))
    assert seen == {True, False}


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, True), (False, True, True), (False, False, False)])
def test_native_bf16_on_cpu_follows_the_instruction_set(monkeypatch, avx512_bf16, amx,
                                                         expected):
    from iwm.training.step import native_bf16

    # The probes are private torch functions: the test fails if a release drops them.
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16),
                        ("_is_amx_tile_supported", amx)):
        assert callable(getattr(torch.cpu, name))
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value)
    assert native_bf16(torch.device("cpu")) is expected


COLOUR_PRESETS = {"ijepa-cifar": ("cifar10", 32), "iwm-inv-cifar": ("cifar10", 32),
                  "iwm-equi-cifar": ("cifar10", 32), "iwm-inv-stl": ("stl10", 96),
                  "iwm-equi-stl": ("stl10", 96)}


@pytest.mark.parametrize("name", sorted(COLOUR_PRESETS))
def test_the_colour_presets_build_and_train_a_step(name):
    from iwm.training.step import Trainer

    # The preset's model as it is; only the batch is cut, to 2 images of its size.
    cfg = load_config(name, ["train.batch_size=2", "train.device=cpu"])
    assert (cfg.data.name, cfg.data.image_size) == COLOUR_PRESETS[name]
    torch.manual_seed(0)
    trainer = Trainer.create(cfg, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                             device=torch.device("cpu"), steps_per_epoch=4)
    trainer.model.train()
    size = cfg.data.image_size
    out, grad_norm = trainer.step(0, torch.rand(2, 3, size, size))
    assert torch.isfinite(out.loss) and grad_norm > 0
