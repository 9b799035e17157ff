"""The contract every registered autoencoder variant keeps, checked for each name in ``raeflow.list_variants()``.

The checks live in :class:`ContractChecks`, a tester mixin (as diffusers' model testers): ``TestContract`` runs
them on every registered variant, and a test that registers a variant of its own (tests/test_capabilities.py)
runs the same checks by subclassing it. A new variant file is covered as soon as it registers itself. What a
model must do follows from the capabilities it declares (``raeflow.models.capabilities``). ``SMALL`` gives each known variant a small size
(tests share two cores); an unknown name is built with its defaults plus ``input_shape``. ``OVERFIT`` tunes the
learning check for a variant whose loss behaves differently (a KL term, a classification error).
"""
from __future__ import annotations

import inspect
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as SkPCA

import raeflow
from raeflow.config import TrainConfig
from raeflow.io import load_model, save_model
from raeflow.models import capabilities as cap
from raeflow.models.base import Stage, TrainPlan, parameters_of
from raeflow.models.capabilities import capabilities_of
from raeflow.registry import build_model, get_variant
from raeflow.train.loop import TensorBatches, Trainer

VARIANTS = raeflow.list_variants()

SMALL: dict[str, dict] = {
    "ae": {"hidden": [32], "latent_dim": 8},
    "dae": {"hidden": [32], "latent_dim": 8},
    "sparse": {"latent_dim": 32},
    "contractive": {"latent_dim": 32},
    "vae": {"hidden": [128], "latent_dim": 8},
    "aae": {"hidden": [32], "latent_dim": 4, "disc_hidden": [16]},
    "pca": {"latent_dim": 8},
    "cae": {"channels": [8, 16], "latent_dim": 16},
    "sdae": {"hidden": [32, 16]},
    "pixelcnn": {"channels": 16, "layers": 4},
    # ema_decay 0.8: the codebook must follow the encoder within the learning check's 60 steps (0.99 is for
    # real runs of thousands of steps)
    "vqvae": {"channels": 16, "embedding_dim": 4, "codebook_size": 16, "prior_channels": 16, "prior_layers": 3,
              "ema_decay": 0.8},
}

# Overfitting 64 digits: the selection metric (evaluated on the same batch, eval mode) must end at most
# `factor` x its value before training. For BCE on digits that value is ~44 nats per image at initialisation,
# 26.5 for the best constant image (the pixel means) and 13.6 at the floor (the pixels' own entropy), so each
# factor is only reachable by reconstructing individual images: 0.5 (~22); sparse starts at ~92 because of
# its penalty, so 0.27 (~25); the VAE pays KL for every image it tells apart (a collapsed posterior costs 0 KL
# and gives the constant image, 26.5), so 0.57 (~25.5). Measured over seeds 0-2: ae/dae/contractive/aae/cae end
# at 0.33-0.39 of the start, sparse 0.21-0.22, vae 0.49, sdae's error 0.
OVERFIT_DEFAULT = {"epochs": 300, "lr": 1e-2, "factor": 0.5}
# pixelcnn's val_nll on binarised digits starts at ~43; the best model that ignores the context (independent
# pixels at their means) scores 26.5 = 0.615 x the start, so 0.59 is only reachable by reading the pixels before
# each one; measured 0.53-0.57 after 50 epochs (seeds 0-1). vqvae's selection metric is its prior's NLL of the code
# grid (the final stage): 0.39 of the start after 60 epochs per stage (seed 0). Fewer epochs: both are convnets.
OVERFIT: dict[str, dict] = {"sparse": {"factor": 0.27}, "vae": {"factor": 0.57},
                            "pixelcnn": {"epochs": 50, "lr": 2e-2, "factor": 0.59},
                            "vqvae": {"epochs": 60}}

INPUTS = {"digits": "digits_batch", "mnist": "mnist_batch", "docs": "docs_batch"}


def small_model(variant: str, input_shape, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(variant, **{**SMALL.get(variant, {}), "input_shape": list(input_shape), **overrides})


def batch_for(request, data: str):
    return request.getfixturevalue(INPUTS[data])


def build_or_skip_documents(variant: str, data: str, x: torch.Tensor) -> torch.nn.Module:
    """Image-only variants may refuse (D,) document vectors, but only with a ValueError (a clear error), after
    which the test is skipped; any other failure, or a refusal of images, fails it."""
    try:
        return small_model(variant, x.shape[1:])
    except ValueError as e:
        if data == "docs":
            pytest.skip(f"{variant} is image-only: {e}")
        raise


def fit_closed_form(model, x: torch.Tensor) -> None:
    """Run the closed-form stages (PCA) on x so the model holds a real fit."""
    for stage in model.stages(TrainPlan(epochs=1)):
        if stage.closed_form:
            model.accumulate(x)
            model.finalize()


def enter(model, stage: Stage) -> None:
    """What the Trainer does on entering a stage: freeze ``stage.frozen``, call the model's hook."""
    frozen = {id(p) for n in stage.frozen for p in getattr(model, n).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    model.enter_stage(stage)


def loss_stage(model) -> Stage:
    """The first gradient-trained stage (the one whose loss and input corruption matter first)."""
    return next(s for s in model.stages(TrainPlan(epochs=1)) if not s.closed_form)


class ContractChecks:
    """Every check here takes the ``variant`` fixture: subclasses decide which variants it names."""

    @pytest.mark.parametrize("data", list(INPUTS))
    def test_every_phase_gives_finite_loss_and_gradients(self, variant, data, request):
        x, y = batch_for(request, data)
        model = build_or_skip_documents(variant, data, x)
        model.train()
        names = {id(p): n for n, p in model.named_parameters()}
        stages = model.stages(TrainPlan(epochs=1))
        assert stages, f"{variant} declares no stages"
        for stage in stages:
            enter(model, stage)
            yy = y if stage.supervised else None  # unsupervised stages must not need labels
            if stage.closed_form:
                model.accumulate(x)
                model.finalize()
                terms = model(x, yy, stage=stage.name)
                assert torch.isfinite(terms["loss"]), f"{variant}/{stage.name}: loss {terms['loss']}"
                continue
            assert stage.phases, f"{variant}/{stage.name}: a gradient stage needs phases"
            for ph in stage.phases:
                params = list(parameters_of(model, ph.modules))
                assert params, f"{variant}/{stage.name}/{ph.name} trains no parameters"
                model.zero_grad(set_to_none=True)
                terms = model(x, yy, stage=stage.name, phase=ph.name)
                assert "loss" in terms and terms["loss"].dim() == 0, f"{variant}: 'loss' must be a scalar"
                for k, v in terms.items():
                    assert torch.isfinite(v).all(), f"{variant}/{stage.name}/{ph.name}: term {k} = {v}"
                terms["loss"].backward()
                no_grad = [names[id(p)] for p in params if p.grad is None]
                bad = [names[id(p)] for p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
                assert not no_grad, f"{variant}/{stage.name}/{ph.name}: no gradient reaches {no_grad}"
                assert not bad, f"{variant}/{stage.name}/{ph.name}: non-finite gradients in {bad}"

    @pytest.mark.parametrize("data", list(INPUTS))
    def test_declared_capabilities_keep_their_promises(self, variant, data, request):
        """Each declared capability's methods exist and answer the documented shapes; undeclared ones are not
        offered (a consumer that trusted a wrong declaration would fail at run time)."""
        x, y = batch_for(request, data)
        model = build_or_skip_documents(variant, data, x)
        fit_closed_form(model, x)
        model.eval()
        caps = capabilities_of(model)
        assert caps, f"{variant} declares no capabilities"
        for c in caps:
            for method in cap.METHODS[c]:
                assert callable(getattr(model, method, None)), f"{variant} declares {c!r} but has no {method}()"
        n = len(x)
        with torch.no_grad():
            if cap.ENCODE in caps:
                z = model.encode(x)
                assert z.shape == (n, model.latent_dim) and torch.isfinite(z).all()
            if cap.RECONSTRUCT in caps:
                out = model.decode(model.encode(x))
                assert out.shape == x.shape == (n, *model.input_shape) and torch.isfinite(out).all()
                assert model.reconstruct(x).shape == x.shape
            if cap.DENOISE in caps:
                assert model.denoise(x).shape == x.shape
            if cap.POSTERIOR in caps:
                mu, logvar = model.encode_stats(x)
                assert mu.shape == logvar.shape == (n, model.latent_dim)
                torch.testing.assert_close(mu, model.encode(x))  # the code is the posterior mean
            if cap.LIKELIHOOD in caps and data != "docs":
                ll = model.log_likelihood(torch.bernoulli(x.clamp(0, 1)), 4)
                assert ll.shape == (n,) and torch.isfinite(ll).all() and (ll <= 0).all()
            if cap.CLASSIFY in caps:
                assert model.predict(x).shape[0] == n
            if cap.DISCRETE_CODES in caps:
                idx = model.encode_indices(x)
                assert idx.shape[0] == n and idx.dtype == torch.int64
        if cap.GENERATE not in caps and hasattr(model, "sample"):
            with pytest.raises(NotImplementedError):
                model.sample(2)

    def test_save_load_is_bit_identical_and_in_eval_mode(self, variant, digits_batch, tmp_path):
        x, _ = digits_batch
        model = small_model(variant, x.shape[1:])
        fit_closed_form(model, x)
        with torch.no_grad():  # move every parameter off its initial value so loading visibly matters
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.eval()
        save_model(model, tmp_path / "model")
        loaded = load_model(tmp_path / "model")
        assert type(loaded) is type(model) and loaded.config == model.config
        assert not any(m.training for m in loaded.modules()), "load_model must return the model in eval mode"
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        caps = capabilities_of(model)
        with torch.no_grad():
            if cap.ENCODE in caps:
                assert torch.equal(model.encode(x), loaded.encode(x))
            if cap.RECONSTRUCT in caps:
                assert torch.equal(model.reconstruct(x), loaded.reconstruct(x))

    def test_learns_a_small_real_batch(self, variant, digits_batch):
        x, y = digits_batch
        model = small_model(variant, x.shape[1:])
        if all(s.closed_form for s in model.stages(TrainPlan(epochs=1))):
            if variant == "pca":  # PCA's closed form must equal scikit-learn's fit instead
                self._pca_matches_sklearn(model, x)
                return
            pytest.skip(f"{variant} is fitted in closed form: nothing to learn by gradient")
        spec = {**OVERFIT_DEFAULT, **OVERFIT.get(variant, {})}
        cfg = TrainConfig(epochs=spec["epochs"], batch_size=len(x), lr=spec["lr"], seed=0)
        trainer = Trainer(model, cfg, log=lambda s: None)
        batches = TensorBatches(x, y, len(x), shuffle=False)
        sel = model.selection_metric
        final_stage = trainer.stages[-1]
        before = trainer.evaluate(batches, final_stage)[sel.removeprefix("val_")]
        epochs: list[dict] = []
        trainer.fit(lambda epoch: batches, lambda: batches, len(batches), lambda r: epochs.append(r.metrics))
        assert len(epochs) == trainer.total_epochs
        after = epochs[-1][sel]
        assert math.isfinite(before) and math.isfinite(after)
        assert after <= spec["factor"] * before, (
            f"{variant}: {sel} went from {before:.4g} to {after:.4g} in {cfg.epochs} epochs; expected at most "
            f"{spec['factor']} x the start")

    @staticmethod
    def _pca_matches_sklearn(model, x):
        cfg = TrainConfig(epochs=1, batch_size=16, seed=0)
        batches = TensorBatches(x, None, 16, shuffle=False)  # several batches: the moments must add up
        Trainer(model, cfg, log=lambda s: None).fit(lambda e: batches, None, len(batches))
        flat = x.flatten(1).double().numpy()
        sk = SkPCA(n_components=model.latent_dim).fit(flat)
        model.eval()
        with torch.no_grad():
            ours = model.reconstruct(x).flatten(1).double().numpy()
        np.testing.assert_allclose(ours, sk.inverse_transform(sk.transform(flat)), atol=2e-5)
        np.testing.assert_allclose(model.explained_variance.double().numpy(), sk.explained_variance_, rtol=1e-4)

    def test_reconstruct_denoise_and_interpolate(self, variant, digits_batch):
        x, _ = digits_batch
        model = small_model(variant, x.shape[1:])
        if not {cap.ENCODE, cap.RECONSTRUCT} <= capabilities_of(model):
            pytest.skip(f"{variant} does not encode and reconstruct")
        fit_closed_form(model, x)
        model.eval()
        with torch.no_grad():
            rec = model.reconstruct(x[:4])
            assert rec.shape == x[:4].shape and model.denoise(x[:4]).shape == x[:4].shape
            path = model.interpolate(x[0], x[1], steps=5)
            assert path.shape == (5, *model.input_shape)
            # The endpoints are the decoded codes of the two inputs (batch of 5 vs 1: allclose). That equals
            # reconstruct() except for cae with max-unpooling, whose reconstruction also uses the encoder's
            # pooling indices, which a bare code on an interpolation path cannot have.
            ends = model.decode(model.encode(x[:2]))
            torch.testing.assert_close(path[0], ends[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(path[-1], ends[1], atol=1e-5, rtol=1e-5)
            if getattr(model, "unpool_mode", "nearest") != "max":
                torch.testing.assert_close(ends, model.reconstruct(x[:2]), atol=1e-5, rtol=1e-5)

    def test_sample_shape(self, variant, digits_batch):
        x, _ = digits_batch
        model = small_model(variant, x.shape[1:]).eval()
        if cap.GENERATE not in capabilities_of(model):
            pytest.skip(f"{variant} declares no generator")
        a = model.sample(6, generator=torch.Generator().manual_seed(3))
        b = model.sample(6, generator=torch.Generator().manual_seed(3))
        assert a.shape == (6, *model.input_shape) and torch.isfinite(a).all()
        assert torch.equal(a, b), "sample(n, generator) must be reproducible from the generator"

    def test_encoder_modules_compute_the_code(self, variant, digits_batch):
        """``encoder_modules()`` (what `finetune` stacks a head on) applied in order must give ``encode(x)``."""
        from raeflow.models.classifier import Classifier

        x, _ = digits_batch
        model = small_model(variant, x.shape[1:]).eval()
        if cap.ENCODE not in capabilities_of(model):
            pytest.skip(f"{variant} has no encoder")
        try:
            clf = Classifier.from_autoencoder(model, num_classes=10).eval()
        except ValueError as e:
            if "no encoder modules" in str(e):  # PCA: a projection held in buffers
                pytest.skip(str(e))
            raise
        with torch.no_grad():
            torch.testing.assert_close(clf.features(x), model.encode(x).flatten(1))

    def test_corruption_is_used_in_training_only(self, variant, digits_batch):
        """A variant that takes ``corruption`` must feed its training input through it, and not in eval mode."""
        if "corruption" not in inspect.signature(get_variant(variant).cls.__init__).parameters:
            pytest.skip(f"{variant} takes no corruption")
        x, y = digits_batch
        everything = {"kind": "masking", "level": 1.0}  # every input zeroed: the loss must change
        nothing = {"kind": "masking", "level": 0.0}
        noisy = small_model(variant, x.shape[1:], corruption=everything)
        clean = small_model(variant, x.shape[1:], corruption=nothing)
        clean.load_state_dict(noisy.state_dict())
        stage = loss_stage(noisy)
        ph = stage.phases[0].name
        yy = y if stage.supervised else None

        def loss(model, train: bool) -> torch.Tensor:
            model.train(train)
            torch.manual_seed(1)
            with torch.no_grad():
                return model(x, yy, stage=stage.name, phase=ph)["loss"]

        assert not torch.allclose(loss(noisy, True), loss(clean, True)), f"{variant} ignores its corruption"
        assert torch.equal(loss(noisy, False), loss(clean, False)), f"{variant} corrupts in eval mode"


class TestContract(ContractChecks):
    @pytest.fixture(params=VARIANTS)
    def variant(self, request) -> str:
        return request.param


def test_core_imports_do_not_import_ray():
    """Models, losses, data, I/O and the plain trainer are plain PyTorch: Ray only on the Ray paths."""
    code = textwrap.dedent("""
        import sys
        import raeflow, raeflow.models, raeflow.losses, raeflow.data, raeflow.io, raeflow.train.loop
        for name in raeflow.list_variants():
            raeflow.build_model(name, input_shape=[1, 8, 8])
        leaked = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        assert not leaked, leaked
        print("ok", len(raeflow.list_variants()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")
