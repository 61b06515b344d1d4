"""Frozen-encoder probes: kNN and attentive probes on constructed features whose answer is
known, the encoder staying frozen, and ``iwm eval probe`` writing its JSON."""

import json
import math

import pytest
import torch

from iwm.config import load_config
from iwm.data.normalize import Normalizer
from iwm.errors import ConfigError
from iwm.evaluation.attentive_probe import train_attentive_probe
from iwm.evaluation.knn import knn_predict, train_knn_probe
from iwm.evaluation.linear_probe import train_linear_probe
from iwm.evaluation.probe import extract_features, probe_encoder, probe_pixels
from iwm.models.vit import create_encoder
from tiny_run import make_tiny_run


def clusters(n: int, n_classes: int = 4, dim: int = 16, noise: float = 0.05,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, n_classes, (n,), generator=gen)
    return centers[y] + noise * torch.randn(n, dim, generator=gen), y


def test_knn_separates_clusters_perfectly():
    train_x, train_y = clusters(200)
    test_x, test_y = clusters(40, seed=1)
    result = train_knn_probe(train_x, train_y, test_x, test_y, k=20)
    assert result.accuracy == 1.0 and result.train_accuracy == 1.0
    assert (result.n_train, result.n_test, result.feature_dim) == (200, 40, 16)


def test_knn_with_labels_unrelated_to_features_is_at_chance():
    # Unstructured features: with clusters, shuffled labels would still give each cluster
    # one (random) majority label, and the accuracy would swing with 4 coin flips.
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(400, 16, generator=gen), torch.randn(1000, 16, generator=gen)
    train_y, test_y = torch.randint(0, 4, (400,), generator=gen), torch.randint(0, 4, (1000,),
                                                                              generator=gen)
    acc = train_knn_probe(train_x, train_y, test_x, test_y, k=20).accuracy
    assert abs(acc - 0.25) < 0.06


def unit(angle_deg: float, axis: int, dim: int = 8) -> torch.Tensor:
    """A unit vector at ``angle_deg`` from e0 towards e_axis (cosine to e0 = cos(angle))."""
    v = torch.zeros(dim)
    v[0], v[axis] = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return v


def test_temperature_lets_few_close_neighbours_outvote_many_far_ones():
    # Two neighbours of class 0 at cosine 0.99, three of class 1 at cosine 0.80: a plain
    # majority (T large: equal weights) says 1; exp(sim / 0.07) weighting says 0.
    close, far = math.degrees(math.acos(0.99)), math.degrees(math.acos(0.80))
    bank = torch.stack([unit(close, 1), unit(close, 2), unit(far, 3), unit(far, 4),
                        unit(far, 5), -unit(0, 1)])  # the last one is never a neighbour
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    query = unit(0, 1)[None]
    assert knn_predict(bank, labels, query, k=5, temperature=0.07).item() == 0
    assert knn_predict(bank, labels, query, k=5, temperature=1e3).item() == 1


def test_knn_chunking_and_scale_do_not_change_predictions():
    train_x, train_y = clusters(100, noise=1.0)
    test_x, _ = clusters(50, noise=1.0, seed=1)
    whole = knn_predict(train_x, train_y, test_x, chunk=1000)
    # Cosine similarity ignores each feature's norm.
    torch.testing.assert_close(knn_predict(7 * train_x, train_y, test_x, chunk=7), whole)


def test_leave_one_out_does_not_vote_for_itself():
    # Every point is its own class: with itself excluded no neighbour has the right label.
    x = torch.randn(10, 4)
    y = torch.arange(10)
    assert (knn_predict(x, y, x, k=1) == y).all()
    assert not (knn_predict(x, y, x, k=1, exclude_self=True) == y).any()


def marker_task(n: int, seed: int, n_tokens: int = 8, dim: int = 32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Label = the position of the one token carrying a marker direction. Tokens are a fixed
    positional code plus noise, so their mean is the same for every label (the marker adds
    the same vector wherever it is): mean pooling cannot solve it, attention can."""
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(99)
    pos, marker = torch.randn(n_tokens, dim, generator=fixed), torch.randn(dim, generator=fixed)
    y = torch.randint(0, n_tokens, (n,), generator=gen)
    tokens = pos + 0.1 * torch.randn(n, n_tokens, dim, generator=gen)
    tokens[torch.arange(n), y] += 3 * marker
    return tokens, y


def test_attentive_probe_reads_what_mean_pooling_averages_away():
    train_t, train_y = marker_task(512, seed=0)
    test_t, test_y = marker_task(256, seed=1)
    # float16 tokens, as extract_features stores them for the attentive probe.
    attentive = train_attentive_probe(train_t.half(), train_y, test_t.half(), test_y,
                                      epochs=6, lr=3e-3, batch_size=64, num_heads=4)
    linear = train_linear_probe(train_t.mean(1), train_y, test_t.mean(1), test_y, max_iter=50)
    assert linear.accuracy < 0.3  # chance is 1/8
    assert attentive.accuracy > 0.9 and attentive.accuracy > linear.accuracy + 0.5


def test_attentive_probe_is_reproducible_and_leaves_global_rng_alone():
    tokens, y = marker_task(64, seed=0)
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    runs = [train_attentive_probe(tokens, y, tokens, y, epochs=1, batch_size=16, seed=3)
            for _ in range(2)]
    assert torch.rand(1) == expected
    assert runs[0] == runs[1]


@pytest.fixture
def probe_cfg(fake_mnist_dir):
    return load_config({}, [f"data.root={fake_mnist_dir}", "probe.attentive_epochs=1",
                            "probe.attentive_batch_size=16", "probe.knn_k=5",
                            "probe.max_iter=20"])


@pytest.mark.parametrize("kind", ["linear", "attentive", "knn"])
def test_probe_leaves_the_encoder_frozen(kind, probe_cfg):
    encoder = create_encoder("vit_micro", img_size=28, patch_size=7, in_chans=1)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    normalize = Normalizer.create((0.5,), (0.25,), torch.device("cpu"))
    result = probe_encoder(encoder, normalize, probe_cfg, torch.device("cpu"), kind)
    assert 0.0 <= result.accuracy <= 1.0 and (result.n_train, result.n_test) == (64, 16)
    assert all(p.grad is None for p in encoder.parameters())
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bf16_probe_features_are_bf16_rounded_copies_of_the_fp32_ones(probe_cfg):
    # probe.bf16 runs the encoder under autocast: the features must differ from fp32 (else
    # autocast never ran) by no more than bf16's rounding, and come back as fp32.
    torch.manual_seed(0)
    encoder = create_encoder("vit_micro", img_size=28, patch_size=7, in_chans=1)
    normalize = Normalizer.create((0.5,), (0.25,), torch.device("cpu"))
    cpu = torch.device("cpu")
    fp32, y32 = extract_features(encoder, normalize, probe_cfg, "test", None, cpu)
    bf16_cfg = load_config(probe_cfg.to_dict(), ["probe.bf16=true"])
    bf16, y16 = extract_features(encoder, normalize, bf16_cfg, "test", None, cpu)
    assert bf16.dtype == torch.float32 and torch.equal(y16, y32)
    assert not torch.equal(bf16, fp32)
    assert (bf16 - fp32).norm() / fp32.norm() < 0.05


def test_raw_pixel_probe_is_the_linear_probe_on_the_images_themselves(fake_mnist_dir,
                                                                      mnist_writer):
    data = mnist_writer(fake_mnist_dir)  # the same files again, to get their contents
    cfg = load_config({}, [f"data.root={fake_mnist_dir}", "data.image_size=28",
                           "probe.train_limit=32", "probe.max_iter=20",
                           "probe.weight_decay=0.01"])
    result = probe_pixels(cfg, torch.device("cpu"))
    # 28 x 28 images at image size 28: the features are the pixels in [0, 1], in order.
    expected = train_linear_probe(data["train_images"][:32].flatten(1).float() / 255,
                                  data["train_labels"][:32],
                                  data["t10k_images"].flatten(1).float() / 255,
                                  data["t10k_labels"], weight_decay=0.01, max_iter=20)
    assert result == expected
    assert (result.n_train, result.n_test, result.feature_dim) == (32, 16, 784)


@pytest.mark.parametrize("kind, override, message", [
    ("svm", None, "must be one of"),
    ("attentive", "probe.attentive_heads=3", "does not divide the encoder width 128"),
])
def test_bad_probe_settings_are_config_errors(kind, override, message, probe_cfg):
    if override:
        probe_cfg = load_config(probe_cfg.to_dict(), [override])
    encoder = create_encoder("vit_micro", img_size=28, patch_size=7, in_chans=1)
    normalize = Normalizer.create((0.5,), (0.25,), torch.device("cpu"))
    with pytest.raises(ConfigError, match=message):
        probe_encoder(encoder, normalize, probe_cfg, torch.device("cpu"), kind)


def test_impossible_probe_numbers_fail_when_the_config_loads(probe_cfg):
    # Not minutes later, after the features are extracted.
    with pytest.raises(ConfigError, match="probe.knn_k=0: must be positive"):
        load_config(probe_cfg.to_dict(), ["probe.knn_k=0"])


def test_cli_eval_probe_writes_json(tmp_path, monkeypatch, capsys):
    from iwm.cli.main import main

    run = make_tiny_run(tmp_path)
    monkeypatch.setenv("IWM_DATA", str(tmp_path / "fmnist"))  # where make_tiny_run put it
    for kind, extra in (("knn", []), ("attentive", ["--encoder", "context",
                                                    "probe.attentive_epochs=1"])):
        assert main(["eval", "probe", str(run), "--kind", kind, *extra]) == 0
        assert f"{kind} probe accuracy" in capsys.readouterr().out
        out = json.loads((run / "results" / f"probe_{kind}.json").read_text())
        assert {"accuracy", "kind", "encoder", "n_train", "n_test", "seconds"} <= out.keys()
        assert out["kind"] == kind and out["n_test"] == 16
        assert out["encoder"] == ("context" if extra else "target")
