"""The private torch APIs iwm relies on still exist and behave as iwm uses them.

A failure here means a torch release changed one of them: adapt
``iwm/torch_internals.py``, the only place that touches them. (The DTensor path of
``lerp_`` runs in the FSDP test of ``tests/training/test_data_parallel.py``.)
"""

import pytest
import torch

from iwm import torch_internals as ti


def _stepped(skip: bool) -> tuple[bool, float]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.ones(1, 3)).sum().backward()
    before = model.weight.detach().clone()
    ti.skip_next_step_if(optimizer, torch.tensor(skip))
    optimizer.step()
    return not torch.equal(model.weight, before), float(optimizer.state[model.weight]["step"])


def test_a_fused_optimizer_skips_its_step_when_found_inf_is_set():
    assert _stepped(skip=True) == (False, 0.0)  # weights and step count untouched
    assert _stepped(skip=False) == (True, 1.0)


def test_a_compiled_module_keeps_the_original_as_orig_mod():
    model = torch.nn.Linear(3, 2)
    assert ti.uncompiled(torch.compile(model)) is model
    assert ti.uncompiled(model) is None


def test_a_failing_compiler_raises_a_dynamo_exception():
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C compiler")

    double = torch.compile(lambda x: x * 2, backend=failing_backend)
    with pytest.raises(Exception) as caught:  # which class is the question
        double(torch.ones(2))
    assert ti.is_compile_error(caught.value)
    assert not ti.is_compile_error(RuntimeError("a model's own error"))


def test_the_cpu_bf16_probes_exist():
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        assert isinstance(getattr(torch.cpu, name)(), bool)
    assert isinstance(ti.cpu_has_native_bf16(), bool)


@pytest.mark.parametrize("weight", [0.25, torch.tensor(0.25), torch.tensor(0.0)])
def test_lerp_moves_every_tensor_by_the_weight(weight):
    starts = [torch.zeros(3), torch.ones(2, 2)]
    ends = [torch.full((3,), 4.0), torch.full((2, 2), 5.0)]
    ti.lerp_(starts, ends, weight)
    w = float(weight)
    assert torch.equal(starts[0], torch.full((3,), 4.0 * w))
    assert torch.equal(starts[1], torch.full((2, 2), 1.0 + 4.0 * w))
