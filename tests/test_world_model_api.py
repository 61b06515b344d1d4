"""The world model as an API: iwm.Action, Pretrained.apply and Pretrained.retrieve."""

import pytest
import torch

import iwm
from iwm.data.actions import ACTION_DIM, ACTION_FIELDS, null_action
from tiny_run import make_tiny_run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return iwm.load(make_tiny_run(tmp_path_factory.mktemp("wm")))


def slots(action: iwm.Action) -> set[str]:
    vec = action.to_tensor()[0]
    return {name for name, v in zip(ACTION_FIELDS, vec.tolist(), strict=True) if v != 0}


def test_identity_action_is_the_null_action():
    torch.testing.assert_close(iwm.Action().to_tensor(3), null_action(3))
    identity = iwm.Action(brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0,
                          grayscale=False, blur_sigma=0.0, solarize=False)
    torch.testing.assert_close(identity.to_tensor(), null_action(1))


@pytest.mark.parametrize("field, value, expected", [
    # A blur also raises its flag: that is the layout of iwm.data.actions, which Action
    # only names.
    ("brightness", 1.3, {"brightness"}),
    ("contrast", 0.7, {"contrast"}),
    ("saturation", 1.2, {"saturation"}),
    ("hue", 0.05, {"hue"}),
    ("grayscale", True, {"grayscale"}),
    ("blur_sigma", 1.0, {"blur", "blur_sigma"}),
    ("solarize", True, {"solarize"}),
])
def test_each_field_changes_only_its_slot(field, value, expected):
    assert slots(iwm.Action(**{field: value})) == expected


def test_action_values_follow_the_documented_layout():
    vec = iwm.Action(brightness=1.3, hue=0.05, blur_sigma=1.0).to_tensor(2, "cpu")
    assert vec.shape == (2, ACTION_DIM) and vec.dtype == torch.float32
    row = dict(zip(ACTION_FIELDS, vec[1].tolist(), strict=True))
    assert row["brightness"] == pytest.approx(torch.log(torch.tensor(1.3)).item())
    assert row["hue"] == pytest.approx(0.1)
    assert row["blur_sigma"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="brightness"):
        iwm.Action(brightness=-1.0)


def test_apply_predicts_every_position_and_depends_on_the_action(model):
    tokens = model.encode(torch.rand(2, 1, 28, 28))
    same = model.apply(tokens, iwm.Action())
    assert same.shape == tokens.shape
    action = iwm.Action(brightness=1.5, contrast=0.6)
    brighter = model.apply(tokens, action)
    torch.testing.assert_close(brighter, model.apply(tokens, action.to_tensor(2)))
    assert not torch.allclose(brighter, same)  # feature conditioning sees the action


def test_apply_predicts_each_position_without_its_own_source_token(model):
    # As in training, a target position is never in the context it is predicted from: a
    # change of the source token at a position moves the other half's predictions only.
    tokens = model.encode(torch.rand(2, 1, 28, 28))
    action = iwm.Action(brightness=1.3)
    base = model.apply(tokens, action)
    changed = tokens.clone()
    changed[:, 0] += 1.0
    moved = model.apply(changed, action)
    torch.testing.assert_close(moved[:, 0], base[:, 0])
    assert (moved - base).abs().amax() > 1e-4
    assert model.apply_tile == 3  # 7 x 7 grid, target blocks of 15-20%: about 3 x 3
    # predict() without masks is the downstream reuse: every token context and target.
    assert not torch.allclose(model.predict(tokens, action=action.to_tensor(2)), base)


def test_retrieve_finds_the_exact_match_first(model):
    bank = model.encode(torch.rand(6, 1, 28, 28))
    scores, idx = model.retrieve(bank[[4, 1]], bank, k=3)
    assert idx.shape == scores.shape == (2, 3)
    assert idx[:, 0].tolist() == [4, 1]
    torch.testing.assert_close(scores[:, 0], torch.ones(2))
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # Pooled features work too, and k is capped at the bank size.
    scores, idx = iwm.Pretrained.retrieve(bank.mean(1)[[2]], bank.mean(1), k=50)
    assert idx.shape == (1, 6) and idx[0, 0] == 2
    with pytest.raises(ValueError, match="bank"):
        model.retrieve(bank, bank[0, 0])
