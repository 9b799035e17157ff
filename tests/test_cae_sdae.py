"""The convolutional AE (unpooling, shapes, training) and the stacked denoising AE (stages, freezing, accuracy)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raeflow.config import RunConfig, TrainConfig
from raeflow.data import load_eval_data, load_training_data
from raeflow.io import load_model
from raeflow.models.base import TrainPlan, reconstruction_loss
from raeflow.models.cae import ConvAE, unpool
from raeflow.models.sdae import StackedDAE
from raeflow.train.loop import TensorBatches, Trainer
from raeflow.train.run import train
from raeflow.train.rundir import RunDir

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ CAE
def test_max_unpool_puts_each_max_back_at_its_argmax():
    x = torch.tensor([[1., 5., 2., 0.],
                      [3., 4., 8., 1.],
                      [0., 0., 6., 7.],
                      [9., 2., 1., 3.]]).reshape(1, 1, 4, 4)
    pooled, idx = torch.nn.MaxPool2d(2, return_indices=True)(x)
    assert pooled.flatten().tolist() == [5., 8., 9., 7.]
    expected = torch.tensor([[0., 5., 0., 0.],
                             [0., 0., 8., 0.],
                             [0., 0., 0., 7.],
                             [9., 0., 0., 0.]]).reshape(1, 1, 4, 4)
    assert torch.equal(unpool(pooled, (4, 4), idx), expected)
    # An odd size: pooling dropped the last row and column, unpooling restores them as zeros.
    x5 = torch.arange(25.).reshape(1, 1, 5, 5)
    p5, i5 = torch.nn.MaxPool2d(2, return_indices=True)(x5)
    u5 = unpool(p5, (5, 5), i5)
    assert u5.shape == (1, 1, 5, 5)
    assert u5[0, 0].nonzero().tolist() == [[1, 1], [1, 3], [3, 1], [3, 3]]  # the max of each 2x2 window
    assert u5[0, 0, 4].abs().sum() == 0 and u5[0, 0, :, 4].abs().sum() == 0


def test_cae_encoder_indices_mark_the_maxima_of_its_own_feature_maps():
    torch.manual_seed(0)
    model = ConvAE(input_shape=(1, 8, 8), channels=(4, 6))
    x = torch.rand(3, 1, 8, 8)
    block = model.blocks[0]
    act = F.relu(block.conv(x))  # (3, 4, 8, 8) the map that was pooled
    pooled, idx = block.pooled_with_indices(x)
    up = unpool(pooled, (8, 8), idx)
    window_max = act.reshape(3, 4, 4, 2, 4, 2).amax(dim=(3, 5))  # (3, 4, 4, 4)
    spread = window_max.repeat_interleave(2, 2).repeat_interleave(2, 3)  # (3, 4, 8, 8)
    expected = torch.where((act == spread) & (act > 0), act, torch.zeros_like(act))
    assert torch.equal(up, expected)
    # At most one non-zero per window: the values are placed, not spread.
    nonzero = (up != 0).reshape(3, 4, 4, 2, 4, 2).sum(dim=(3, 5))
    assert nonzero.max() <= 1 and (up != 0).sum() == (pooled != 0).sum()


def test_nearest_unpool_copies_each_value_into_its_window():
    p = torch.tensor([[1., 2.], [3., 4.]]).reshape(1, 1, 2, 2)
    assert unpool(p, (4, 4))[0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    assert unpool(p, (5, 5))[0, 0, 4].tolist() == [3, 3, 4, 4, 4]  # odd size: the last row/column replicated


def _manual_nearest_decode(model: ConvAE, z: torch.Tensor) -> torch.Tensor:
    """The decoder written out by hand with copy-upsampling (sizes here are even)."""
    h = F.relu(model.unbottleneck(z)).reshape(z.shape[0], *model.feature_shape)
    for i, deconv in enumerate(model.deconvs):
        h = deconv(h.repeat_interleave(2, 2).repeat_interleave(2, 3))
        if i < len(model.deconvs) - 1:
            h = F.relu(h)
    return torch.sigmoid(h)


def test_bare_codes_decode_by_copying_and_inputs_reconstruct_with_indices():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    maxed = ConvAE(input_shape=(1, 8, 8), latent_dim=5, channels=(4, 6), unpool="max").eval()
    z = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.allclose(maxed.decode(z), _manual_nearest_decode(maxed, z), atol=1e-6)
        # Reconstructing an input uses the encoder's indices, so it differs from decoding the bare code.
        code = maxed.encode(x)
        assert not torch.allclose(maxed.reconstruct(x), maxed.decode(code), atol=1e-4)
        _, indices = maxed.encode_with_indices(x)
        with_idx = torch.sigmoid(maxed._decode_raw(code, indices))
        assert torch.equal(maxed.reconstruct(x), with_idx)
    nearest = ConvAE(input_shape=(1, 8, 8), latent_dim=5, channels=(4, 6), unpool="nearest").eval()
    with torch.no_grad():  # trained with copying: reconstruct == decode(encode(x)), and no indices anywhere
        assert torch.equal(nearest.reconstruct(x), nearest.decode(nearest.encode(x)))
        assert torch.allclose(nearest.decode(z), _manual_nearest_decode(nearest, z), atol=1e-6)


@pytest.mark.parametrize("shape,kwargs,latent", [
    ((1, 8, 8), {}, 64 * 2 * 2),  # the default channels (32, 64), no bottleneck: the code is C*h*w
    ((1, 28, 28), {"channels": (8, 16)}, 16 * 7 * 7),
    ((1, 28, 28), {"channels": (4, 4, 4), "kernel_size": 5}, 4 * 3 * 3),  # 28 -> 14 -> 7 -> 3 (odd)
    ((3, 16, 16), {"channels": (8, 8), "latent_dim": 12}, 12),  # colour, dense bottleneck
    ((1, 8, 8), {"channels": (4, 4, 4), "latent_dim": 3, "unpool": "nearest"}, 3),  # 8 -> 4 -> 2 -> 1
])
def test_cae_shapes_and_gradients(shape, kwargs, latent):
    torch.manual_seed(0)
    model = ConvAE(input_shape=shape, **kwargs)
    assert model.latent_dim == latent
    x = torch.rand(5, *shape)
    z = model.encode(x)
    assert z.shape == (5, latent)
    for out in (model.decode(z), model.reconstruct(x)):
        assert out.shape == (5, *shape) and out.min() >= 0 and out.max() <= 1
    terms = model(x)
    assert set(terms) == {"loss", "recon"} and math.isfinite(float(terms["loss"].detach()))
    terms["loss"].backward()
    # Every parameter takes part in the loss (DistributedDataParallel requires it).
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_cae_rejects_bad_configs():
    with pytest.raises(ValueError, match="too many"):
        ConvAE(input_shape=(1, 8, 8), channels=(4, 4, 4, 4))  # 8 -> 4 -> 2 -> 1 -> nothing left to pool
    with pytest.raises(ValueError, match="image input"):
        ConvAE(input_shape=(784,))
    with pytest.raises(ValueError, match="odd"):
        ConvAE(input_shape=(1, 8, 8), kernel_size=4)
    with pytest.raises(ValueError, match="unpool"):
        ConvAE(input_shape=(1, 8, 8), unpool="bilinear")


def test_denoising_cae_corrupts_inputs_only_in_training(digits_batch):
    x, _ = digits_batch
    torch.manual_seed(0)
    model = ConvAE(input_shape=(1, 8, 8), channels=(4, 6), corruption={"kind": "masking", "level": 0.5})
    with torch.no_grad():
        model.eval()
        clean = float(model(x)["loss"])
        z, idx = model.encode_with_indices(x)
        assert clean == pytest.approx(float(F.binary_cross_entropy_with_logits(
            model._decode_raw(z, idx), x, reduction="none").sum((1, 2, 3)).mean()), rel=1e-6)
        model.train()
        torch.manual_seed(1)
        noisy = float(model(x)["loss"])
        torch.manual_seed(1)  # the same masks, applied by hand
        x_in = x.masked_fill(torch.rand(x.shape) < 0.5, 0.0)
        z, idx = model.encode_with_indices(x_in)
        by_hand = float(F.binary_cross_entropy_with_logits(model._decode_raw(z, idx), x,
                                                           reduction="none").sum((1, 2, 3)).mean())
    assert noisy == pytest.approx(by_hand, rel=1e-6) and abs(noisy - clean) > 1e-3


def test_cae_trains_on_digits_and_reloads(tmp_path):
    cfg = RunConfig(variant="cae", model={"channels": [8, 16], "latent_dim": 16}, output=str(tmp_path / "run"))
    cfg.data.dataset = "digits"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.threads = 4, 32, 3e-3, 1
    result = train(cfg, local=True, log=lambda s: None)
    rows = RunDir(result.run_dir).read_metrics()
    assert rows[-1]["val_recon"] < 0.8 * rows[0]["val_recon"]  # it learns: validation error falls by > 20%
    model = load_model(result.run_dir)
    assert model.variant == "cae" and model.latent_dim == 16
    x = torch.from_numpy(load_eval_data("digits:test").x[:8])
    with torch.no_grad():
        assert model.reconstruct(x).shape == (8, 1, 8, 8)
        assert torch.equal(model.encode(x), load_model(result.run_dir).encode(x))


# ----------------------------------------------------------------------------------------------- SDAE
def test_sdae_plan_names_stages_and_frozen_modules():
    model = StackedDAE(input_shape=(1, 8, 8), hidden=(16, 12, 8))
    stages = model.stages(TrainPlan(7, {"pretrain": 2}))
    assert [s.name for s in stages] == ["pretrain-1", "pretrain-2", "pretrain-3", "finetune"]
    assert [s.epochs for s in stages] == [2, 2, 2, 7]
    assert [s.supervised for s in stages] == [False, False, False, True]
    assert stages[1].phases[0].modules == ["enc2", "dec2"]
    assert {"enc1", "dec1"} <= set(stages[1].frozen) and not {"enc2", "dec2"} & set(stages[1].frozen)
    assert stages[3].phases[0].modules == ["enc1", "enc2", "enc3", "head"]
    # No pretraining: the randomly initialised baseline (a zero-epoch stage is left out, not run).
    assert [s.name for s in model.stages(TrainPlan(5, {"pretrain": 0}))] == ["finetune"]
    assert model.latent_dim == 8 and model.selection_metric == "val_error"
    assert StackedDAE(input_shape=(1, 8, 8), hidden=(16, 12), latent_dim=4).sizes == [64, 16, 4]


def test_sdae_terms_shapes_and_errors(digits_batch):
    x, y = digits_batch
    model = StackedDAE(input_shape=(1, 8, 8), hidden=(16, 8))
    assert model.encode(x).shape == (64, 8) and model.decode(model.encode(x)).shape == (64, 1, 8, 8)
    assert model.predict(x).shape == (64, 10)
    assert set(model(x, stage="pretrain-2")) == {"loss", "recon"}
    terms = model(x, y, stage="finetune")
    assert set(terms) == {"loss", "ce", "error"} and terms["error"].dtype == torch.float32
    assert 0 <= float(terms["error"]) <= 1
    with pytest.raises(ValueError, match="labels"):
        model(x, None, stage="finetune")
    with pytest.raises(ValueError, match="no stage"):
        model(x, y, stage="pretrain-3")
    with pytest.raises(ValueError, match="0..9"):
        model(x, y + 5, stage="finetune")


def test_sdae_corruption_levels_per_layer_and_finetune_optimiser():
    model = StackedDAE(input_shape=(1, 8, 8), hidden=(16, 12, 8), corruption={"kind": "masking", "level": 0.25},
                       corruption_levels=[0.1, 0.3, 0.6], finetune_optim={"kind": "sgd", "lr": 0.1, "momentum": 0})
    ones = torch.ones(20000, 16)
    model.train()
    # Each layer's pretraining input is masked at its own level (fraction zeroed within 0.01 of it).
    for k, level in [(1, 0.1), (2, 0.3), (3, 0.6)]:
        assert abs(float((model._corrupt_layer(ones, k) == 0).float().mean()) - level) < 0.01
    model.eval()
    assert torch.equal(model._corrupt_layer(ones, 3), ones)  # evaluation sees clean inputs
    finetune = model.stages(TrainPlan(3, {"pretrain": 1}))[-1]
    spec = finetune.phases[0].optim
    assert (spec.kind, spec.lr, spec.momentum_at(0)) == ("sgd", 0.1, 0.0)
    # Without the options: one level everywhere, the run's optimiser.
    plain = StackedDAE(input_shape=(1, 8, 8), hidden=(16, 8))
    assert plain.stages(TrainPlan(3, {"pretrain": 1}))[-1].phases[0].optim is None
    # The trainer honours it: fine-tuning runs on a plain SGD optimiser at lr 0.1 whatever the run's Adam.
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    trainer = Trainer(model, TrainConfig(stage_epochs={"pretrain": 0, "finetune": 1}, batch_size=32),
                      log=lambda s: None)
    trainer.fit(lambda e: TensorBatches(x, y, 32), None, 2, lambda r: None)
    (opt,) = trainer.optimizers.values()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="3 layers but 2"):
        StackedDAE(input_shape=(1, 8, 8), hidden=(16, 12, 8), corruption_levels=[0.1, 0.2])
    with pytest.raises(ValueError, match="out of range"):
        StackedDAE(input_shape=(1, 8, 8), hidden=(16, 8), corruption_levels=[0.1, 1.5])
    with pytest.raises(ValueError, match="unknown finetune_optim"):
        StackedDAE(input_shape=(1, 8, 8), hidden=(16, 8), finetune_optim={"kind": "sgd", "learning_rate": 1})


def test_sdae_pretraining_freezes_lower_layers_and_finetuning_updates_all():
    data = load_training_data("digits")
    x, y = torch.from_numpy(data.train.x[:512]), torch.from_numpy(data.train.y[:512])
    torch.manual_seed(0)
    model = StackedDAE(input_shape=(1, 8, 8), hidden=(24, 16))
    cfg = TrainConfig(epochs=1, stage_epochs={"pretrain": 1, "finetune": 1}, batch_size=64, lr=1e-2)
    trainer = Trainer(model, cfg, log=lambda s: None)
    batches = TensorBatches(x, y, 64)
    snapshots = {"init": copy.deepcopy(model.state_dict())}
    trainer.fit(lambda e: batches, None, len(batches),
                lambda r: snapshots.__setitem__(r.stage, copy.deepcopy(model.state_dict())))

    def same(a, b, prefix):
        keys = [k for k in snapshots[a] if k.startswith(prefix)]
        assert keys
        return all(torch.equal(snapshots[a][k], snapshots[b][k]) for k in keys)

    assert not same("init", "pretrain-1", "enc1.") and not same("init", "pretrain-1", "dec1.")
    assert same("init", "pretrain-1", "enc2.") and same("init", "pretrain-1", "head.")
    # Layer 2's stage: layer 1 bit-identical, layer 2 changed.
    assert same("pretrain-1", "pretrain-2", "enc1.") and same("pretrain-1", "pretrain-2", "dec1.")
    assert not same("pretrain-1", "pretrain-2", "enc2.") and not same("pretrain-1", "pretrain-2", "dec2.")
    # Fine-tuning trains every encoder layer and the head (the decoders are not part of the classifier).
    for prefix in ("enc1.", "enc2.", "head."):
        assert not same("pretrain-2", "finetune", prefix)
    assert same("pretrain-2", "finetune", "dec1.") and same("pretrain-2", "finetune", "dec2.")
    assert all(p.requires_grad for p in model.enc1.parameters())  # the fine-tuning stage unfroze layer 1


def test_sdae_on_digits_classifies_far_better_than_chance(tmp_path):
    cfg = RunConfig(variant="sdae", model={"hidden": [128, 64]}, output=str(tmp_path / "run"))
    cfg.data.dataset = "digits"
    cfg.train.stage_epochs = {"pretrain": 2, "finetune": 10}
    cfg.train.batch_size, cfg.train.lr, cfg.train.threads = 32, 3e-3, 1
    result = train(cfg, local=True, log=lambda s: None)
    assert result.selection_metric == "val_error" and result.epochs == 2 * 2 + 10
    model = load_model(result.run_dir)
    assert model.config["num_classes"] == 10  # filled from the dataset's classes
    test = load_eval_data("digits:test")
    with torch.no_grad():
        error = (model.predict(torch.from_numpy(test.x)).argmax(1).numpy() != test.y).mean()
    assert error < 0.3  # chance is 0.9 (measured: 0.20 on the 300 test digits)
    assert result.best < 0.2  # validation error of the selected epoch


def test_sdae_on_unlabelled_data_fails_before_training(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = RunConfig(variant="sdae", model={"hidden": [8]}, output=str(tmp_path / "run"))
    cfg.data.dataset = str(folder)
    with pytest.raises(ValueError, match="labels"):
        train(cfg, local=True, log=lambda s: None)
    assert not (tmp_path / "run").exists()  # refused before any directory was made


def test_sdae_tied_decoders_read_the_encoders_weights_and_train_with_them():
    """tied=True: each decoder owns a bias only and reconstructs through the encoder's weight, transposed; its
    pretraining gradient reaches that weight, and fine-tuning (decoders frozen) still trains the encoder."""
    data = load_training_data("digits")
    x, y = torch.from_numpy(data.train.x[:512]), torch.from_numpy(data.train.y[:512])
    torch.manual_seed(0)
    tied = StackedDAE(input_shape=(1, 8, 8), hidden=(24, 16), tied=True, corruption=None)
    untied = StackedDAE(input_shape=(1, 8, 8), hidden=(24, 16), corruption=None)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(untied) - n_params(tied) == 64 * 24 + 24 * 16  # the two decoder weight matrices
    assert [n for n, _ in tied.dec1.named_parameters()] == ["bias"]
    # Layer 1 decodes its codes h through W1ᵀ: pre-activation h W1 + b (W1 is (24, 64), so h W1 is W1ᵀ applied).
    h = tied.enc1(x.flatten(1))
    expect = h @ tied.enc1[0].weight + tied.dec1.bias  # (B, 64) pre-activation
    raw = tied._decode_layer(h, 1)
    assert raw.shape == (512, 64) and torch.allclose(raw, expect)
    # W1 is used twice, by the encoder and (transposed) by the decoder: its gradient is not the encoder's alone.
    tied.zero_grad()
    tied(x, stage="pretrain-1")["loss"].backward()
    g_both = tied.enc1[0].weight.grad.clone()
    w = tied.enc1[0].weight.detach().clone().requires_grad_(True)
    enc_only = reconstruction_loss(F.linear(torch.sigmoid(F.linear(x.flatten(1), w, tied.enc1[0].bias)),
                                            tied.enc1[0].weight.detach().t(), tied.dec1.bias), x.flatten(1), "bce")
    (g_enc,) = torch.autograd.grad(enc_only, w)
    assert not torch.allclose(g_both, g_enc, atol=1e-6)
    # Train both stages: fine-tuning changes the encoder, not the (frozen) decoder biases.
    cfg = TrainConfig(epochs=1, stage_epochs={"pretrain": 1, "finetune": 1}, batch_size=64, lr=1e-2)
    trainer = Trainer(tied, cfg, log=lambda s: None)
    batches = TensorBatches(x, y, 64)
    snaps = {}
    trainer.fit(lambda e: batches, None, len(batches),
                lambda r: snaps.__setitem__(r.stage, copy.deepcopy(tied.state_dict())))
    assert not torch.equal(snaps["pretrain-2"]["enc1.0.weight"], snaps["finetune"]["enc1.0.weight"])
    assert torch.equal(snaps["pretrain-2"]["dec1.bias"], snaps["finetune"]["dec1.bias"])
    assert torch.equal(snaps["pretrain-1"]["enc1.0.weight"], snaps["pretrain-2"]["enc1.0.weight"])
