"""RBM pretraining (Hinton & Salakhutdinov 2006) as stages of the one trainer: CD-k's gradient through the
free-energy surrogate, unrolling into the autoencoder, the declared SGD momentum schedule, resume mid-pretraining."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from raeflow.config import TrainConfig
from raeflow.data import load_training_data
from raeflow.models.ae import DenseAE
from raeflow.models.base import TrainPlan, reconstruction_loss
from raeflow.models.rbm import GAUSSIAN, POISSON, RBM
from raeflow.train.loop import TensorBatches, Trainer, seed_everything


@pytest.mark.parametrize("hidden,visible", [("bernoulli", "bernoulli"), (GAUSSIAN, "bernoulli"),
                                            ("bernoulli", POISSON)])
def test_cd1_surrogate_gradient_is_the_hand_computed_cd_estimate(hidden, visible):
    """autograd on the surrogate loss gives -(<v h>_data - <v h>_model) / B, with <.>_model from one Gibbs step
    computed here by hand from the same random numbers; plus weight_cost * W on the weights only. Poisson visible
    units: the negative data are the rates N * softmax(h W + b), N each document's word count."""
    torch.manual_seed(0)
    rbm = RBM(5, 3, hidden, visible=visible)
    with torch.no_grad():
        rbm.hidden_bias.normal_()
        rbm.visible_bias.normal_()
    # grey levels, as Hinton's code feeds them; or word counts 0..6, one document without any vocabulary word
    v = torch.rand(7, 5) if visible == "bernoulli" else torch.randint(0, 7, (7, 5)).float() * (torch.arange(7) > 0)[:, None]
    W, c, b = rbm.weight.detach(), rbm.hidden_bias.detach(), rbm.visible_bias.detach()
    wc = 0.01

    torch.manual_seed(1)
    terms = rbm.cd_terms(v, k=1, weight_cost=wc)
    terms["loss"].backward()

    # By hand, replaying the same random draws: sample h | v, mean-field v' | h, hidden means of v'.
    torch.manual_seed(1)
    pre = v @ W.T + c  # (7, 3)
    if hidden == "bernoulli":
        ph = torch.sigmoid(pre)
        h = (ph > torch.rand(7, 3)).float()
    else:
        ph = pre
        h = ph + torch.randn(7, 3)
    if visible == "bernoulli":
        v_neg = torch.sigmoid(h @ W + b)  # (7, 5)
    else:
        v_neg = v.sum(1, keepdim=True) * torch.softmax(h @ W + b, dim=1)
        torch.testing.assert_close(v_neg.sum(1), v.sum(1))  # rates sum to the length; the empty row stays empty
    pre_neg = v_neg @ W.T + c
    ph_neg = torch.sigmoid(pre_neg) if hidden == "bernoulli" else pre_neg
    grad_w = -(ph.T @ v - ph_neg.T @ v_neg) / 7 + wc * W  # (3, 5), nn.Linear layout
    grad_c = -(ph - ph_neg).mean(0)
    grad_b = -(v - v_neg).mean(0)
    torch.testing.assert_close(rbm.weight.grad, grad_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rbm.hidden_bias.grad, grad_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rbm.visible_bias.grad, grad_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["recon"], ((v - v_neg) ** 2).sum(1).mean())


def test_multinomial_loss_is_the_cross_entropy_of_each_documents_word_distribution():
    counts = torch.tensor([[2.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])  # (3, 4)
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 0.0, 0.0]])
    q = torch.softmax(logits, dim=1)
    by_hand = [-(0.5 * q[0, 0].log() + 0.25 * q[0, 1].log() + 0.25 * q[0, 3].log()), 0.0, -q[2, 1].log()]
    # per document, not per word: the 5-word and 4-word documents weigh the same; the empty one adds nothing
    torch.testing.assert_close(reconstruction_loss(logits, counts, "multinomial"), sum(by_hand) / 3)
    with pytest.raises(ValueError, match="multinomial"):
        reconstruction_loss(logits, counts, "poisson")


def test_document_model_unrolls_a_poisson_bottom_rbm_into_a_softmax_decoder():
    """Hinton & Salakhutdinov's document AE: counts in, word distribution out. Before fine-tuning, the unrolled
    net computes the RBM stack's mean-field pass, whose bottom rates divided by N are the decoder's softmax."""
    torch.manual_seed(0)
    model = DenseAE(input_shape=(12,), latent_dim=2, hidden=(8, 4), activation="sigmoid", loss="multinomial",
                    rbm={}).eval()
    assert [model.rbms.layer(k).visible for k in (1, 2, 3)] == [POISSON, "bernoulli", "bernoulli"]
    assert not model.bounded  # counts in: no [0, 1] check may refuse them
    with torch.no_grad():
        for k in (1, 2, 3):
            model.rbms.layer(k).visible_bias.normal_()
    x = torch.randint(0, 4, (5, 12)).float() + torch.eye(5, 12)  # (5, 12) counts, every row non-empty
    model.enter_stage(model.stages(TrainPlan(stage_epochs={"rbm": 1, "finetune": 1}))[-1], fresh=True)
    out = model.reconstruct(x)
    torch.testing.assert_close(out.sum(1), torch.ones(5))
    torch.testing.assert_close(out, model.rbms.mean_field_reconstruction(x) / x.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="word counts"):
        DenseAE(input_shape=(12,), latent_dim=2, hidden=(8,), activation="sigmoid", loss="mse", rbm={})

    # `raeflow eval`'s reconstruction scores it as a language model, the loss it trained on (not squared error).
    from raeflow.data.core import ArrayDataset
    from raeflow.evaluate import reconstruction

    res = reconstruction(model, ArrayDataset("toy", "test", x.numpy(), kind="text"), None, {})
    logq = out.detach().double().log()
    assert res["cross_entropy_per_document"] == pytest.approx(
        float(reconstruction_loss(logq.float(), x, "multinomial")), rel=1e-5)
    assert res["perplexity_per_word"] == pytest.approx(math.exp(-(x * logq).sum().item() / x.sum().item()), rel=1e-5)


def test_poisson_rbm_learns_topics_from_word_counts():
    """CD-1 on documents drawn from two disjoint 'topics' (words 0-9 vs 10-19): the one-step reconstruction error
    falls, and the hidden means tell the topics apart (a behaviour, not just a run)."""
    g = torch.Generator().manual_seed(0)
    topic = torch.arange(400) % 2  # (400,)
    probs = torch.zeros(400, 20)
    probs[topic == 0, :10] = 0.1
    probs[topic == 1, 10:] = 0.1
    lengths = torch.randint(20, 80, (400,), generator=g)
    docs = torch.stack([torch.bincount(torch.multinomial(p, int(n), replacement=True, generator=g), minlength=20)
                        for p, n in zip(probs, lengths)]).float()  # (400, 20) counts
    torch.manual_seed(0)
    rbm = RBM(20, 4, visible=POISSON, init_std=0.01)
    opt = torch.optim.SGD(rbm.parameters(), lr=0.001, momentum=0.5)
    first = rbm.cd_terms(docs)["recon"].item()
    for _ in range(30):
        for i in range(0, 400, 50):
            opt.zero_grad()
            rbm.cd_terms(docs[i:i + 50])["loss"].backward()
            opt.step()
    assert rbm.cd_terms(docs)["recon"].item() < 0.5 * first
    h = rbm.hidden_mean(docs).detach()
    gap = (h[topic == 0].mean(0) - h[topic == 1].mean(0)).abs().max().item()
    assert gap > 0.5, gap


def _small_rbm_ae(**kw) -> DenseAE:
    return DenseAE(input_shape=(1, 8, 8), latent_dim=4, hidden=(32, 16), activation="sigmoid", rbm=kw.pop("rbm", {}),
                   **kw)


@pytest.mark.parametrize("tied", [False, True])
def test_unrolled_autoencoder_first_pass_is_the_rbm_stacks_mean_field_pass(digits_batch, tied):
    x = digits_batch[0]
    torch.manual_seed(0)
    model = _small_rbm_ae(tied=tied).eval()
    stages = model.stages(TrainPlan(stage_epochs={"rbm": 1, "finetune": 1}))
    assert [s.name for s in stages] == ["rbm-1", "rbm-2", "rbm-3", "finetune"]
    assert model.rbms.layer(3).hidden == GAUSSIAN  # the linear code layer's RBM
    with torch.no_grad():  # RBMs that are not the encoder's initial weights, as after pretraining
        for k in (1, 2, 3):
            model.rbms.layer(k).visible_bias.normal_()
            model.rbms.layer(k).hidden_bias.normal_()
    before = model.reconstruct(x)
    model.enter_stage(stages[-1], fresh=True)
    flat = x.flatten(1)
    torch.testing.assert_close(model.encode(x), model.rbms.up(flat, 3))
    torch.testing.assert_close(model.reconstruct(x).flatten(1), model.rbms.mean_field_reconstruction(flat))
    assert not torch.allclose(before, model.reconstruct(x))  # the unroll really replaced the weights

    # A resumed run re-entering fine-tuning part-way keeps its fine-tuned weights.
    with torch.no_grad():
        next(model.encoder.parameters()).add_(1.0)
    tuned = model.reconstruct(x)
    model.enter_stage(stages[-1], fresh=False)
    torch.testing.assert_close(model.reconstruct(x), tuned)


def test_rbm_settings_are_checked():
    with pytest.raises(ValueError, match="activation: sigmoid"):
        DenseAE(input_shape=(1, 8, 8), latent_dim=4, hidden=(16,), activation="relu", rbm={})
    with pytest.raises(ValueError, match="unknown rbm settings"):
        _small_rbm_ae(rbm={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="no RBMs"):
        DenseAE(input_shape=(1, 8, 8), latent_dim=4, hidden=(16,))(torch.rand(2, 1, 8, 8), stage="rbm-1")


def _run(x, cfg, stop_at: int | None = None, state=None):
    """Train a fresh small RBM-pretrained AE; record each epoch's parameters and SGD momentum. ``stop_at``:
    raise after that epoch's checkpoint, as a killed run would; ``state``: resume from a checkpoint."""
    seed_everything(0)
    model = _small_rbm_ae(rbm={"momentum_epochs": 1, "lr": 0.05})
    trainer = Trainer(model, cfg, log=lambda s: None)
    if state is not None:
        trainer.load_state_dict(state)
    batches = TensorBatches(x, None, 64, seed=0)
    log: dict = {}

    def on_epoch_end(r):
        opt = next(iter(trainer.optimizers.values()))
        log[r.epoch] = {"stage": r.stage, "momentum": opt.param_groups[0].get("momentum"),
                        "state": copy.deepcopy(model.state_dict()), "recon": r.metrics["train_recon"],
                        "checkpoint": copy.deepcopy(trainer.state_dict())}
        if r.epoch == stop_at:
            raise KeyboardInterrupt

    def train_batches(epoch):
        batches.set_epoch(epoch)
        return batches

    try:
        trainer.fit(train_batches, None, len(batches), on_epoch_end)
    except KeyboardInterrupt:
        pass
    return model, log


def test_pretraining_stages_momentum_schedule_and_resume_mid_pretraining():
    x = torch.from_numpy(load_training_data("digits").train.x[:512])
    cfg = TrainConfig(stage_epochs={"rbm": 2, "finetune": 2}, batch_size=64, lr=1e-3, seed=0)
    model, full = _run(x, cfg)
    assert [full[e]["stage"] for e in range(1, 9)] == ["rbm-1"] * 2 + ["rbm-2"] * 2 + ["rbm-3"] * 2 + ["finetune"] * 2
    # The declared schedule: momentum 0.5 in each RBM's first epoch, 0.9 after (momentum_epochs=1).
    assert [full[e]["momentum"] for e in range(1, 7)] == [0.5, 0.9] * 3
    # Each RBM stage trains its RBM only; the autoencoder's layers change first at fine-tuning.
    s = {e: full[e]["state"] for e in full}
    assert not torch.equal(s[2]["rbms.rbm1.weight"], s[1]["rbms.rbm1.weight"])
    assert torch.equal(s[4]["rbms.rbm1.weight"], s[2]["rbms.rbm1.weight"])
    assert torch.equal(s[6]["encoder.0.weight"], s[1]["encoder.0.weight"])
    assert torch.equal(s[8]["rbms.rbm1.weight"], s[6]["rbms.rbm1.weight"])
    assert full[2]["recon"] < full[1]["recon"]  # CD is learning the digits

    # Killed after epoch 3 (inside rbm-2), resumed from that checkpoint: the same weights to the last bit.
    _, first = _run(x, cfg, stop_at=3)
    assert max(first) == 3
    resumed, rest = _run(x, cfg, state=first[3]["checkpoint"])
    assert min(rest) == 4 and [rest[e]["momentum"] for e in (4, 5, 6)] == [0.9, 0.5, 0.9]
    for k, v in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_sdae_stack_pretrains_as_rbms_and_unrolls_into_its_layers(digits_batch):
    from raeflow.models.sdae import StackedDAE

    x = digits_batch[0]
    torch.manual_seed(0)
    model = StackedDAE(input_shape=(1, 8, 8), hidden=(24, 16), rbm={}).eval()
    stages = model.stages(TrainPlan(stage_epochs={"rbm": 1, "finetune": 1}))
    assert [s.name for s in stages] == ["rbm-1", "rbm-2", "finetune"] and stages[-1].supervised
    assert "rbms" in stages[-1].frozen and "enc1" in stages[0].frozen and "rbms.rbm2" in stages[0].frozen
    assert torch.isfinite(model(x, stage="rbm-2")["loss"])
    model.enter_stage(stages[-1])
    torch.testing.assert_close(model.encode(x), model.rbms.up(x.flatten(1), 2))
    torch.testing.assert_close(torch.sigmoid(model._decode_raw(model.encode(x))),
                               model.rbms.mean_field_reconstruction(x.flatten(1)))


def test_sparse_init_gives_each_unit_k_nonzero_incoming_weights():
    """Martens' initialisation, the no-pretraining baseline: K non-zero N(0,1) weights per unit, zero biases."""
    torch.manual_seed(0)
    model = DenseAE(input_shape=(1, 8, 8), latent_dim=4, hidden=(32, 8), activation="sigmoid", sparse_init=15)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6
    for m in linears:
        nonzero = (m.weight != 0).sum(1)  # (out,)
        assert torch.equal(nonzero, torch.full_like(nonzero, min(15, m.in_features))), m
        assert torch.count_nonzero(m.bias) == 0
    w = torch.cat([m.weight.detach()[m.weight != 0] for m in linears])
    assert 0.8 < float(w.std()) < 1.2  # N(0, 1), not a scaled default init
