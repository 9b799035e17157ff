"""`raeflow tune` on Ray Tune: search-space parsing, a grid that must find a planted best value, ASHA stopping."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from raeflow.config import RunConfig
from raeflow.tune import Dist, apply, parse_space, tune_runs


def _base(**train) -> RunConfig:
    cfg = RunConfig(variant="ae", model={"hidden": [32], "latent_dim": 8})
    cfg.data.dataset = "digits"
    cfg.train.epochs = 3
    cfg.train.batch_size = 64
    cfg.train.lr = 1e-2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_space_parsing_and_refusals(tmp_path):
    space = parse_space(["train.lr=loguniform(1e-4, 1e-2)", "model.hidden=choice([64], [128, 32])",
                         "train.batch_size=grid(32, 64)", "train.weight_decay=uniform(0, 1e-3)"])
    assert space["train.lr"] == Dist("loguniform", [1e-4, 1e-2])
    assert space["model.hidden"].args == [[64], [128, 32]]
    assert space["train.batch_size"] == Dist("grid", [32, 64])
    cfg = apply(_base().to_dict(), {"train.lr": 0.003, "model.hidden": [128, 32]})
    assert cfg.train.lr == 0.003 and cfg.model["hidden"] == [128, 32] and cfg.model["latent_dim"] == 8
    for bad, match in [("train.lr=normal(0,1)", "distribution"), ("train.lr=uniform(2, 1)", "lo < hi"),
                       ("train.lr=loguniform(0, 1)", "lo > 0"), ("train.lr", "KEY=DIST"), ("x=choice()", "values")]:
        with pytest.raises(ValueError, match=match):
            parse_space([bad])
    with pytest.raises(ValueError, match="unknown keys in 'train'"):
        apply(_base().to_dict(), {"train.learning_rate": 0.1})
    # Selection never looks at anything but a validation metric (no Ray is started for these refusals).
    with pytest.raises(ValueError, match="validation metric"):
        tune_runs(_base(), space, metric="test_loss", output=tmp_path / "t")
    with pytest.raises(ValueError, match="validation metric"):
        tune_runs(_base(), space, metric="train_loss", output=tmp_path / "t")
    # --evaluate names raeflow eval tasks: a typo is refused before the search, not after it
    with pytest.raises(ValueError, match="unknown task"):
        tune_runs(_base(), space, metric="val_loss", output=tmp_path / "t", evaluate=["clasify"])
    assert not (tmp_path / "t").exists()


@pytest.mark.ray
def test_grid_on_digits_picks_the_planted_best_code_size(ray_local, tmp_path):
    """Four trials at once (0.5 CPU each): a wider code reconstructs digits better, so the 16-d code must win."""
    out = tmp_path / "search"
    res = tune_runs(_base(), parse_space(["model.latent_dim=grid(1, 2, 4, 16)"]), metric="val_loss", mode="min",
                    output=out, log=lambda s: None)
    assert res.best.values == {"model.latent_dim": 16}
    by_dim = {r.values["model.latent_dim"]: r for r in res.rows}
    assert sorted(by_dim) == [1, 2, 4, 16]
    losses = [by_dim[k].best for k in (1, 2, 4, 16)]
    assert losses == sorted(losses, reverse=True), losses  # monotone: the planted ordering came out
    with (out / "trials.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and table[0]["model.latent_dim"] == "16" and all(r["epochs"] == "3" for r in table)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"] == {"hidden": [32], "latent_dim": 16} and best["train"]["lr"] == 1e-2
    assert "(best)" in (out / "trials.md").read_text()
    # Each trial is an ordinary raeflow run: its own run.yaml with its value, metrics per epoch, a saved model.
    for dim, r in by_dim.items():
        run = yaml.safe_load((tmp_path / "search" / "trials" / r.trial / "run.yaml").read_text())
        assert run["model"]["latent_dim"] == dim and run["train"]["threads"] == 1
        assert len((tmp_path / "search" / "trials" / r.trial / "metrics.jsonl").read_text().splitlines()) == 3
        assert (tmp_path / "search" / "trials" / r.trial / "model").is_dir()


@pytest.mark.ray
def test_asha_stops_poor_trials_early(ray_local, tmp_path):
    """One trial at a time, the good learning rate first: ASHA compares each later trial at the epoch-1 and
    epoch-2 rungs with what came before and stops the ones that learn too slowly."""
    res = tune_runs(_base(epochs=4), parse_space(["train.lr=grid(1e-2, 1e-5, 3e-6, 1e-6)"]), metric="val_loss",
                    scheduler="asha", max_concurrent=1, output=tmp_path / "asha", log=lambda s: None)
    by_lr = {r.values["train.lr"]: r for r in res.rows}
    assert res.best.values == {"train.lr": 1e-2} and by_lr[1e-2].epochs == 4
    stopped = [lr for lr, r in by_lr.items() if r.stopped_early]
    assert len(stopped) >= 2 and 1e-2 not in stopped, {lr: r.epochs for lr, r in by_lr.items()}
    assert all(r.planned == 4 for r in res.rows)
    # A trial that ran its whole plan finished as an ordinary run, model saved (not cut off after its last report).
    assert (tmp_path / "asha" / "trials" / res.best.trial / "model" / "config.json").is_file()


@pytest.mark.ray
def test_pretrain_then_finetune_trials_search_both_configs(ray_local, tmp_path):
    """`raeflow tune --finetune`: one grid over a pretraining setting (code size) and the fine-tuning lr. Each
    trial pretrains, then fine-tunes its own encoder; selection is on the classifier's validation error, and the
    planted best (the wide code, the lr that learns) must win."""
    ft = RunConfig()
    ft.data.dataset = "digits"
    ft.train.epochs, ft.train.batch_size, ft.model = 3, 64, {"dropout": 0.0}
    out = tmp_path / "pipeline"
    res = tune_runs(_base(epochs=2), parse_space(["model.latent_dim=grid(1, 16)", "finetune.train.lr=grid(1e-2, 1e-7)"]),
                    metric="val_error", output=out, finetune=ft, log=lambda s: None)
    assert res.best.values == {"model.latent_dim": 16, "finetune.train.lr": 1e-2}
    errors = {(r.values["model.latent_dim"], r.values["finetune.train.lr"]): r.best for r in res.rows}
    assert errors[(16, 1e-2)] < 0.2 < errors[(16, 1e-7)], errors  # 1e-7 leaves the head at chance (10 classes)
    assert errors[(16, 1e-2)] < errors[(1, 1e-2)], errors
    assert all(r.epochs == 3 and r.planned == 3 for r in res.rows)  # fine-tuning epochs only are reported
    for r in res.rows:
        trial = out / "trials" / r.trial
        pre = yaml.safe_load((trial / "pretrain" / "run.yaml").read_text())
        fine = yaml.safe_load((trial / "finetune" / "run.yaml").read_text())
        assert pre["model"]["latent_dim"] == r.values["model.latent_dim"] and pre["train"]["epochs"] == 2
        assert fine["train"]["lr"] == r.values["finetune.train.lr"] and fine["variant"] == "classifier"
        # the classifier started from this trial's own encoder, not another trial's
        assert Path(fine["model"]["pretrained"]["path"]) == (trial / "pretrain" / "model").resolve()
        assert r.run_dir == str(trial / "finetune")
    # one pretraining per distinct autoencoder config, each trained once: 2 code sizes, not 4 trials
    shared = sorted(p for p in (out / "pretrain").iterdir() if p.is_dir())
    assert len(shared) == 2 and {(t / "pretrain").resolve() for t in (out / "trials").iterdir()} == set(shared)
    for p in shared:
        assert len((p / "metrics.jsonl").read_text().splitlines()) == 2  # its 2 epochs, not trained twice
    assert yaml.safe_load((out / "best.yaml").read_text())["model"]["latent_dim"] == 16
    assert yaml.safe_load((out / "best-finetune.yaml").read_text())["train"]["lr"] == 1e-2
    assert "best-finetune.yaml" in (out / "trials.md").read_text()


@pytest.mark.ray
def test_a_staged_model_is_judged_on_its_last_stage(ray_local, tmp_path):
    """An sdae trial pretrains layer by layer (no val_error; val_loss a reconstruction), then fine-tunes: only the
    fine-tuning epochs are reported and selected on (Vincent et al.'s fine-tuning lr searched on validation)."""
    base = RunConfig(variant="sdae", model={"hidden": [32, 32], "corruption": {"kind": "masking", "level": 0.2},
                                            "finetune_optim": {"kind": "adam", "lr": 1e-2}})
    base.data.dataset = "digits"
    base.train.batch_size, base.train.stage_epochs = 64, {"pretrain": 1, "finetune": 3}
    out = tmp_path / "sdae"
    res = tune_runs(base, parse_space(["model.finetune_optim.lr=grid(1e-2, 1e-7)"]), metric="val_error",
                    output=out, evaluate=["classify"], log=lambda s: None)
    assert res.best.values == {"model.finetune_optim.lr": 1e-2}
    # --evaluate: the chosen trial, and no other, measured on the test split; test.json says which and how
    test = json.loads((out / "test.json").read_text())
    assert test == json.loads(json.dumps(res.test))
    assert test["trial"] == res.best.trial and test["run_dir"] == res.best.run_dir and test["split"] == "test"
    assert test["validation"] == res.best.best and list(test["tasks"]) == ["classify"]
    assert 0 < test["tasks"]["classify"]["test_error"] < 0.5 and test["tasks"]["classify"]["n"] == 300
    saved = json.loads((Path(res.best.run_dir) / "eval" / "eval-digits.json").read_text())
    assert saved["tasks"]["classify"]["test_error"] == test["tasks"]["classify"]["test_error"]
    assert [r.trial for r in res.rows if (Path(r.run_dir) / "eval").exists()] == [res.best.trial]
    errors = {r.values["model.finetune_optim.lr"]: r.best for r in res.rows}
    assert errors[1e-2] < 0.5 < errors[1e-7], errors  # 0.30 vs 0.90 measured: 1e-7 leaves the head at chance
    # 3 fine-tuning epochs reported, not the 2 pretraining epochs before them
    assert all(r.epochs == 3 and r.planned == 3 and 3 <= r.best_epoch <= 5 for r in res.rows)  # run-wide numbering
    for r in res.rows:  # the trials did pretrain: both layers' stages are in the run's own metrics
        stages = {json.loads(line)["stage"] for line in (out / "trials" / r.trial / "metrics.jsonl").open()}
        assert stages == {"pretrain-1", "pretrain-2", "finetune"}, stages


def test_finetune_axes_need_a_finetune_config(tmp_path):
    from raeflow.tune import load_finetune_config

    with pytest.raises(ValueError, match="--finetune"):
        tune_runs(_base(), parse_space(["finetune.train.lr=grid(1e-2)"]), metric="val_error", output=tmp_path / "t")
    (tmp_path / "ft.yaml").write_text("train: {epochs: 2}\nmodel: {dropout: 0.1}\n")
    ft = load_finetune_config(tmp_path / "ft.yaml", _base())
    assert ft.data.dataset == "digits" and ft.train.epochs == 2  # the labels default to the pretraining data's
    (tmp_path / "bad.yaml").write_text("model: {latent_dim: 4}\n")
    with pytest.raises(ValueError, match="only \\['dropout', 'head_hidden'\\]"):
        load_finetune_config(tmp_path / "bad.yaml", _base())
