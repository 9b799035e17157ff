"""Fine-tuning a trained encoder into a classifier: weights carried over, save/load, accuracy, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from raeflow.cli.main import app
from raeflow.config import RunConfig
from raeflow.data import load_eval_data
from raeflow.finetune import finetune
from raeflow.io import load_model, read_config, save_model
from raeflow.models.classifier import Classifier
from raeflow.registry import build_model, list_variants
from raeflow.train.run import train
from raeflow.train.rundir import RunDir

torch.set_num_threads(1)
QUIET = {"log": lambda s: None}


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """A dense AE 64-64-16 trained 5 epochs on digits (about 3 s): the encoder every test fine-tunes."""
    out = tmp_path_factory.mktemp("ae") / "run"
    cfg = RunConfig(variant="ae", model={"hidden": [64], "latent_dim": 16}, output=str(out))
    cfg.data.dataset = "digits"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.threads = 5, 32, 1
    train(cfg, local=True, **QUIET)
    return out


@pytest.fixture(scope="module")
def digits_test():
    d = load_eval_data("digits:test")
    return torch.from_numpy(d.x), d.y


def _image_folder(root, n: int, size: int, labelled: bool):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / (f"class{i % 2}" if labelled else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_classifier_starts_from_the_trained_encoder(ae_run, digits_test):
    x, _ = digits_test
    ae = load_model(ae_run)
    clf = Classifier.from_autoencoder(ae, num_classes=10)
    with torch.no_grad():
        # The AE's code is linear (code_activation "linear"), so the classifier's features are exactly it.
        torch.testing.assert_close(clf.features(x), ae.encode(x))
    assert clf.feature_dim == 16 and clf.predict(x).shape == (len(x), 10)
    random = Classifier("ae", dict(ae.config), 10)  # from the config alone: random weights, the baseline
    assert not torch.allclose(random.features(x), clf.features(x))
    assert "classifier" not in list_variants()


@pytest.mark.parametrize("variant,config,features", [
    ("cae", {"channels": [4, 8]}, 8 * 2 * 2),  # no bottleneck: the last pooled map, flattened
    ("cae", {"channels": [4, 8], "latent_dim": 6}, 6),  # flattened before the dense bottleneck
    ("sdae", {"hidden": [12, 7]}, 7),
])
def test_classifier_stacks_on_conv_and_stacked_encoders(variant, config, features, digits_test):
    x, _ = digits_test
    torch.manual_seed(0)
    base = build_model(variant, input_shape=[1, 8, 8], **config).eval()
    clf = Classifier.from_autoencoder(base, num_classes=10, head_hidden=5)
    assert clf.feature_dim == features
    with torch.no_grad():
        torch.testing.assert_close(clf.features(x[:16]), base.encode(x[:16]))
    assert clf.encode(x[:16]).shape == (16, 5) and clf.predict(x[:16]).shape == (16, 10)


def test_classifier_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="no encoder modules"):
        Classifier("pca", {"input_shape": [1, 8, 8], "latent_dim": 4}, 10)
    with pytest.raises(ValueError, match="does not match"):
        Classifier("ae", {"input_shape": [1, 8, 8], "hidden": [8], "latent_dim": 4}, 10, input_shape=[1, 28, 28])
    with pytest.raises(KeyError, match="unknown variant"):
        Classifier("nope", {}, 10)


def test_classifier_save_load_gives_identical_logits(ae_run, digits_test, tmp_path):
    x, y = digits_test
    clf = Classifier.from_autoencoder(load_model(ae_run), num_classes=10, head_hidden=12)
    with torch.no_grad():
        for p in clf.head.parameters():  # off the initial values, so loading visibly matters
            p.add_(0.05 * torch.randn_like(p))
    clf.eval()
    save_model(clf, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert isinstance(loaded, Classifier) and loaded.config == clf.config
    assert read_config(tmp_path / "model")["variant"] == "classifier"
    with torch.no_grad():
        assert torch.equal(clf.predict(x), loaded.predict(x))
        terms = loaded(x, torch.from_numpy(y))
    assert set(terms) == {"loss", "ce", "error"} and 0 <= float(terms["error"]) <= 1


def test_finetune_trains_a_classifier_far_better_than_chance(ae_run, digits_test, tmp_path):
    x, y = digits_test
    result = finetune(ae_run, "digits", tmp_path / "ft", epochs=8, lr=3e-3, batch_size=32, local=True,
                      sets=["train.threads=1"], **QUIET)
    assert result.selection_metric == "val_error" and result.epochs == 8
    rows = RunDir(result.run_dir).read_metrics()
    assert all(r["stage"] == "finetune" and "val_error" in r for r in rows)
    assert result.best == min(r["val_error"] for r in rows) < rows[0]["val_error"]
    model = load_model(result.run_dir)
    assert isinstance(model, Classifier) and model.config["pretrained"]["variant"] == "ae"
    with torch.no_grad():
        error = (model.predict(x).argmax(1).numpy() != y).mean()
    assert error < 0.25  # chance is 0.9; measured 0.13 on the 300 test digits
    saved = RunDir(result.run_dir).config()  # run.yaml says what was trained
    assert saved.variant == "classifier" and saved.model["base_variant"] == "ae"


def test_finetune_with_one_seed_repeats_itself_whatever_ran_before(ae_run, tmp_path):
    """train.seed decides the head's initial weights too: the same seed gives the same run even after other random
    draws in the process (it used to take the head from wherever the global RNG stood), another seed another run."""
    def run(name, seed):
        torch.rand(17)  # whatever the process drew before
        result = finetune(ae_run, "digits", tmp_path / name, epochs=2, batch_size=64, local=True,
                          sets=["train.threads=1", f"train.seed={seed}"], **QUIET)
        return [(r["train_ce"], r["val_ce"]) for r in RunDir(result.run_dir).read_metrics()]

    first = run("a", 3)
    assert run("b", 3) == first
    assert run("c", 4) != first


def test_finetune_without_a_validation_split_selects_by_training_error_and_says_so(ae_run, tmp_path):
    """data.val_size=0 (a final model on every labelled row): no val_* metric exists, the kept epoch is the one with
    the lowest training error (the earliest of equals), and the summary names that metric, not val_error."""
    lines: list[str] = []
    result = finetune(ae_run, "digits", tmp_path / "all", epochs=3, batch_size=64, local=True,
                      sets=["train.threads=1", "data.val_size=0"], log=lines.append)
    rows = RunDir(result.run_dir).read_metrics()
    assert not any(k.startswith("val_") for r in rows for k in r)
    best = min(rows, key=lambda r: (r["train_error"], r["epoch"]))
    assert (result.best_epoch, result.best) == (best["epoch"], pytest.approx(best["train_error"]))
    summary = "\n".join(lines)
    assert "by train_error (no validation split)" in summary and "by val_error" not in summary


def test_finetune_cli_end_to_end(ae_run, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["finetune", "--model", str(ae_run), "--dataset", "digits", "--output", str(out),
                                 "--epochs", "2", "--batch-size", "64", "--head-hidden", "16", "--local",
                                 "--set", "train.threads=1"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["variant"] == "classifier" and cfg["model"]["head_hidden"] == 16
    assert cfg["model"]["base_variant"] == "ae" and cfg["data"]["classes"] == [str(i) for i in range(10)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("val_error" in row for row in rows)
    assert (out / "plots" / "loss.png").is_file()


def test_finetune_refuses_unlabelled_data_mismatched_shapes_and_classifiers(ae_run, tmp_path):
    flat = _image_folder(tmp_path / "flat", 12, 8, labelled=False)
    r = CliRunner().invoke(app, ["finetune", "--model", str(ae_run), "--dataset", str(flat),
                                 "--output", str(tmp_path / "o1"), "--local"])
    assert r.exit_code == 2 and "has no labels" in r.output
    big = _image_folder(tmp_path / "big", 12, 10, labelled=True)
    with pytest.raises(ValueError, match="does not match"):
        finetune(ae_run, str(big), tmp_path / "o2", epochs=1, local=True, **QUIET)
    with pytest.raises(ValueError, match="test split"):
        finetune(ae_run, "digits:test", tmp_path / "o3", epochs=1, local=True, **QUIET)
    clf_dir = tmp_path / "clf"
    save_model(Classifier.from_autoencoder(load_model(ae_run), 10), clf_dir)
    with pytest.raises(ValueError, match="not an autoencoder"):
        finetune(clf_dir, "digits", tmp_path / "o4", epochs=1, local=True, **QUIET)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # nothing written for a refused run


@pytest.mark.parametrize("build", [
    lambda p: Classifier("ae", {"input_shape": [1, 8, 8], "hidden": [32], "latent_dim": 16}, 10, head_hidden=24,
                         dropout=p),
    lambda p: build_model("sdae", input_shape=(1, 8, 8), hidden=(32, 16), dropout=p),
], ids=["classifier", "sdae"])
def test_dropout_is_random_in_training_identity_in_eval_and_recorded(build, digits_test):
    x, _ = digits_test
    x = x[:64]
    plain, dropped = build(0.0), build(0.5)
    dropped.load_state_dict(plain.state_dict())  # same weights: only dropout differs
    assert dropped.config["dropout"] == 0.5 and plain.config["dropout"] == 0.0
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain.predict(x), dropped.predict(x))  # eval mode: dropout is the identity
        dropped.train()
        torch.manual_seed(0)
        a = dropped.predict(x)
        b = dropped.predict(x)
    assert not torch.allclose(a, b)  # training mode: a fresh mask per call
    with pytest.raises(ValueError, match="dropout"):
        build(1.0)
