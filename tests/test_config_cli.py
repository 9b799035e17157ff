"""Run config precedence, recipes, the run directory's guarantees, and the CLI's thin commands."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import raeflow
from raeflow.cli.common import build_run_config
from raeflow.config import RunConfig
from raeflow.models.capabilities import ENCODE, LIKELIHOOD, capabilities_of
from raeflow.registry import build_model, list_variants
from raeflow.train.run import train

ROOT = Path(__file__).resolve().parents[1]
INPUT_SHAPES = {"mnist": [1, 28, 28], "fashion-mnist": [1, 28, 28], "digits": [1, 8, 8], "20newsgroups": [2000]}


def test_precedence_defaults_yaml_set_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("variant: vae\nmodel: {latent_dim: 8}\ntrain: {epochs: 7, lr: 1e-3}\n")
    cfg = build_run_config(f, ["train.epochs=9", "model.hidden=[64, 32]"], variant=None, epochs=None, lr=5e-4,
                           latent_dim=None, dataset="digits", workers=None, gpu=False, batch_size=None,
                           output=None, seed=None, storage_path=None, address=None)
    assert cfg.variant == "vae"  # no --variant given: the file's variant stands
    assert cfg.train.epochs == 9 and cfg.train.lr == 5e-4  # --set over YAML, flags over --set
    assert cfg.model == {"latent_dim": 8, "hidden": [64, 32]}
    assert isinstance(cfg.train.lr, float) and cfg.data.dataset == "digits"


def test_yaml_numbers_without_dot_are_numbers():
    cfg = RunConfig.from_dict({"train": {"lr": "1e-3"}})
    assert cfg.train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("bad", [{"trian": {}}, {"train": {"epoch": 3}}])
def test_unknown_keys_are_refused(bad):
    with pytest.raises(ValueError, match="unknown"):
        RunConfig.from_dict(bad)


def test_round_trip_through_yaml(tmp_path):
    cfg = RunConfig(variant="sdae", model={"hidden": [10]}).override(["train.stage_epochs.pretrain=3"])
    cfg.save(tmp_path / "r.yaml")
    assert RunConfig.from_yaml(tmp_path / "r.yaml") == cfg
    assert cfg.train.stage_epochs == {"pretrain": 3}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_builds_its_model(path):
    cfg = RunConfig.from_yaml(path)
    assert cfg.variant in list_variants()
    model = build_model(cfg.variant, input_shape=INPUT_SHAPES[cfg.data.dataset], **cfg.model)
    x = torch.zeros(2, *INPUT_SHAPES[cfg.data.dataset])
    caps = capabilities_of(model)
    if ENCODE in caps:
        assert model.encode(x).shape[0] == 2
    else:  # a model without a code (pixelcnn) still answers what it declares
        assert LIKELIHOOD in caps and model.log_likelihood(x).shape == (2,)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_every_finetune_config_loads_as_a_head(path):
    """configs/finetune/ holds `raeflow tune --finetune` configs: a classifier head's settings, not a model."""
    from raeflow.finetune import head_options
    from raeflow.tune import load_finetune_config

    base = RunConfig.from_yaml(ROOT / "configs" / "mnist-contractive.yaml")
    ft = load_finetune_config(path, base)
    head = head_options(ft)
    assert 0.0 <= head["dropout"] < 1.0
    assert ft.train.epochs > 0 and ft.train.lr > 0
    assert ft.data.dataset in INPUT_SHAPES


def test_every_recipe_script_names_files_that_exist():
    """A recipe script (configs/*.sh) that points at a moved config fails only after an hour's run otherwise."""
    import re

    for script in (ROOT / "configs").glob("*.sh"):
        for name in re.findall(r"configs/[\w./-]+\.(?:yaml|sh)", script.read_text()):
            assert (ROOT / name).is_file(), f"{script.name} names {name}, which does not exist"


def test_run_directory_is_never_overwritten(tmp_path):
    cfg = RunConfig(variant="pca", model={"latent_dim": 4}, output=str(tmp_path / "run"))
    cfg.data.dataset = "digits"
    train(cfg, local=True, log=lambda s: None)
    saved = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, local=True, log=lambda s: None)
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == saved
    run_yaml = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert run_yaml["variant"] == "pca" and run_yaml["model"] == {"latent_dim": 4}
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["variant"] == "pca" and config["data"]["input_shape"] == [1, 8, 8]
    assert config["raeflow_version"] == raeflow.__version__


@pytest.mark.parametrize("env, setting, expected", [("1", None, 1), ("3", None, 3), ("1", 2, 2), ("", None, None),
                                                    ("zero", None, None)])
def test_a_local_run_honours_omp_num_threads_unless_train_threads_is_set(env, setting, expected, tmp_path,
                                                                         monkeypatch):
    """Two runs started side by side with OMP_NUM_THREADS=1 must each use one torch thread, as torch's own default
    does: raeflow's cores-per-worker default made them spin two OpenMP threads each on two cores (5-6x slower)."""
    import os

    monkeypatch.setenv("OMP_NUM_THREADS", env)
    cfg = RunConfig(variant="ae", model={"hidden": [16], "latent_dim": 4}, output=str(tmp_path / "run"))
    cfg.data.dataset, cfg.train.epochs, cfg.train.threads = "digits", 1, setting
    seen = []
    before = torch.get_num_threads()
    try:
        train(cfg, local=True, log=lambda s: s.startswith("epoch ") and seen.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert seen == [expected or os.cpu_count()]  # while the epoch trained


def test_local_resume_continues_an_interrupted_run(tmp_path):
    cfg = RunConfig(variant="ae", model={"hidden": [16], "latent_dim": 4}, output=str(tmp_path / "r0"))
    cfg.data.dataset, cfg.train.epochs, cfg.train.threads = "digits", 4, 1

    def interrupt_after_epoch_2(line: str) -> None:  # as if the driver were killed after epoch 2's checkpoint
        if line.startswith("epoch 2/4"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, local=True, log=interrupt_after_epoch_2)
    before = torch.load(tmp_path / "r0" / "checkpoints" / "latest" / "checkpoint.pt", weights_only=True)
    assert before["progress"]["epoch"] == 2
    # Killed between epoch 2's checkpoint and its metrics row: the checkpoint carries the row, so resuming restores it.
    metrics = tmp_path / "r0" / "metrics.jsonl"
    kept = metrics.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in kept] == [1, 2] and before["row"] == json.loads(kept[1])
    metrics.write_text(kept[0] + "\n")
    # The run directory moves (another disk, another machine) before it is resumed: it continues where it is.
    (tmp_path / "r0").rename(tmp_path / "r")
    lines: list[str] = []
    train(RunConfig(output=str(tmp_path / "r")), resume=True, local=True, log=lines.append)
    assert not (tmp_path / "r0").exists()
    assert any("resumed" in line and "epoch 2" in line for line in lines)
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["3/4", "4/4"]  # 1-2 not redone
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[1] == before["row"]
    assert rows[3]["train_loss"] < rows[0]["train_loss"]
    # Extending a finished run's plan in run.yaml and resuming trains only the new epochs.
    saved = RunConfig.from_yaml(tmp_path / "r" / "run.yaml")
    saved.train.epochs = 5
    saved.save(tmp_path / "r" / "run.yaml")
    train(RunConfig(output=str(tmp_path / "r")), resume=True, local=True, log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    # The same through the caller's own settings (the CLI's --epochs): the plan extends and run.yaml records it.
    more = RunConfig(output=str(tmp_path / "r"))
    more.train.epochs = 6
    lines = []
    train(more, resume=True, local=True, log=lines.append, given=frozenset({"output", "train.epochs"}))
    assert "resume with train.epochs: 5 -> 6" in lines
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["6/6"]
    assert RunConfig.from_yaml(tmp_path / "r" / "run.yaml").train.epochs == 6
    # A setting that would train something else from this checkpoint is refused, not ignored.
    other = RunConfig(output=str(tmp_path / "r"))
    other.train.epochs, other.train.lr = 7, 0.5
    with pytest.raises(ValueError, match=r"cannot change train\.lr \(0\.001 there, 0\.5 given\)"):
        train(other, resume=True, local=True, log=lambda s: None,
              given=frozenset({"output", "train.epochs", "train.lr"}))
    assert RunConfig.from_yaml(tmp_path / "r" / "run.yaml").train.epochs == 6
    # The recipe file the run began with (epochs: 4) does not undo the extension; a changed recipe is refused.
    recipe = RunConfig(output=str(tmp_path / "r"))
    recipe.train.epochs = 4
    train(recipe, resume=True, local=True, log=lambda s: None, given=frozenset({"output"}),
          recipe=frozenset({"train.epochs"}))
    assert RunConfig.from_yaml(tmp_path / "r" / "run.yaml").train.epochs == 6
    recipe.train.batch_size = 7
    with pytest.raises(ValueError, match=r"cannot change train\.batch_size"):
        train(recipe, resume=True, local=True, log=lambda s: None, given=frozenset({"output"}),
              recipe=frozenset({"train.epochs", "train.batch_size"}))


def test_given_keys_are_the_files_the_sets_and_the_flags(tmp_path):
    from raeflow.cli.common import given_keys

    f = tmp_path / "c.yaml"
    f.write_text("variant: vqvae\nmodel: {channels: 8, corruption: {kind: masking}}\n"
                 "train: {stage_epochs: {vq: 3}, lr: 1.0e-3}\n")
    keys, recipe = given_keys(f, ["train.stage_epochs.prior=20"], epochs=None, lr=None, workers=2, gpu=False)
    assert keys == {"train.stage_epochs.prior", "ray.workers"}
    assert recipe == {"variant", "model.channels", "model.corruption.kind", "train.stage_epochs.vq", "train.lr"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raeflow.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_lists_every_variant_and_dataset():
    out = _cli("variants").stdout
    assert [line.split()[0] for line in out.strip().splitlines()] == list_variants()
    ds = _cli("datasets").stdout
    for name in ("mnist", "fashion-mnist", "digits", "20newsgroups", "reuters-r8", "reuters-r52"):
        assert f"\n{name} " in "\n" + ds
    assert _cli("--version").stdout.strip() == f"raeflow {raeflow.__version__}"


COMMANDS = {"variants", "datasets", "train", "finetune", "embed", "search", "serve", "eval", "showcase", "bench"}


def test_cli_has_exactly_the_documented_commands_each_with_help():
    """The click command tree (not the help text, which mentions 'train' and 'serve' in its tagline) must hold
    exactly the commands the README documents, and each must answer --help with its own usage line."""
    import typer
    from typer.testing import CliRunner

    from raeflow.cli.main import app

    group = typer.main.get_command(app)
    assert set(group.commands) >= COMMANDS, sorted(COMMANDS - set(group.commands))
    runner = CliRunner()
    for name in sorted(group.commands):
        r = runner.invoke(app, [name, "--help"])
        usage = next((line for line in r.output.splitlines() if "Usage:" in line), "")
        assert r.exit_code == 0 and f" {name} " in usage + " ", (name, r.output[:300])
        assert group.commands[name].help, f"`raeflow {name}` has no help text"
    readme = (ROOT / "README.md").read_text()
    for name in COMMANDS - {"variants", "datasets"}:
        assert f"raeflow {name}" in readme, f"README does not document `raeflow {name}`"


def test_cli_bad_input_is_one_clear_line(tmp_path):
    r = _cli("train", "--local", "--variant", "nope", "--dataset", "digits", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown variant 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = _cli("train", "--local", "--dataset", "no-such-set", "-o", str(tmp_path / "y"))
    assert r.returncode == 2 and "unknown dataset" in r.stderr and "mnist" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
