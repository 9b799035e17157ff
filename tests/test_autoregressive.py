"""PixelCNN and VQ-VAE maths: the causal mask, the exact likelihood, the straight-through gradient, the EMA
codebook, reproducible sampling, and the codebook kept in sync across two Ray Train workers.

Everything but the last test is plain PyTorch on tiny images (one thread, a few seconds in all).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raeflow.models import capabilities as cap
from raeflow.models.capabilities import capabilities_of
from raeflow.models.pixel_layers import GatedPixelCNN
from raeflow.models.vqvae import EMAQuantizer, perplexity
from raeflow.registry import build_model


def _dependency(net: GatedPixelCNN, c: int, h: int, w: int, trials: int = 3) -> torch.Tensor:
    """(h*w, h*w) boolean: [p, q] is True when some output channel at position p has a non-zero derivative
    w.r.t. some input channel at position q (raster order), on any of ``trials`` random inputs."""
    dep = torch.zeros(h * w, h * w, dtype=torch.bool)
    net = net.double()
    for t in range(trials):
        x = torch.randn(1, c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        jac = torch.autograd.functional.jacobian(net, x)  # (1, C_out, h, w, 1, C_in, h, w)
        jac = jac.abs().sum(dim=(0, 1, 4, 5))  # (h, w, h, w)
        dep |= jac.reshape(h * w, h * w) > 0
    return dep


@pytest.mark.parametrize("c_in,c_out", [(1, 1), (5, 5)])  # pixelcnn's Bernoulli pixels; the prior's 5 codes
def test_gated_pixelcnn_is_causal_with_no_blind_spot(c_in, c_out):
    """Output at position p depends on exactly the positions before p in raster order: never on p itself or
    later (causality), and on every earlier one (no blind spot: the original PixelCNN missed the pixels up and
    to the right). 5 layers of 3x3 reach the whole 5x5 image, so "every earlier position" is exact."""
    torch.manual_seed(0)
    net = GatedPixelCNN(c_in, c_out, channels=8, layers=5, kernel_size=3)
    dep = _dependency(net, c_in, 5, 5)
    expected = torch.ones(25, 25, dtype=torch.bool).tril(-1)  # strictly earlier positions
    assert torch.equal(dep, expected), f"dependency pattern:\n{dep.int()}"


def test_changing_pixel_i_never_changes_the_distribution_of_pixels_up_to_i():
    """The issue's form of the same property, on the model itself: flip pixel i of a random binary image; the
    predicted Bernoulli logits of every pixel <= i (raster order) stay the same, and some later one moves."""
    torch.manual_seed(0)
    model = build_model("pixelcnn", input_shape=[1, 6, 6], channels=8, layers=4).eval()
    x = torch.bernoulli(torch.full((1, 1, 6, 6), 0.5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model.logits(x).flatten()
        for i in range(35):
            y = x.clone().flatten()
            y[i] = 1 - y[i]
            out = model.logits(y.view_as(x)).flatten()
            torch.testing.assert_close(out[: i + 1], base[: i + 1], atol=1e-6, rtol=0)
            assert (out[i + 1:] - base[i + 1:]).abs().max() > 1e-4, f"pixel {i} influences no later pixel"


def test_exact_nll_equals_pixel_by_pixel_sum():
    """log p(x) from one pass equals sum_i log p(x_i | x_<i) computed one pixel at a time, where the pass for
    pixel i sees garbage at pixels >= i (so a leak from the future would change the answer)."""
    torch.manual_seed(0)
    model = build_model("pixelcnn", input_shape=[1, 4, 4], channels=8, layers=3).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.4), generator=g)
    total = torch.zeros(3)
    with torch.no_grad():
        for i in range(16):
            ctx = x.clone().flatten(1)
            ctx[:, i:] = torch.bernoulli(torch.full_like(ctx[:, i:], 0.5), generator=g)  # the future: noise
            logit = model.logits(ctx.view_as(x)).flatten(1)[:, i]
            xi = x.flatten(1)[:, i]
            total += xi * F.logsigmoid(logit) + (1 - xi) * F.logsigmoid(-logit)
        exact = model.log_likelihood(x)
    assert exact.shape == (3,)
    torch.testing.assert_close(exact, total, atol=1e-5, rtol=1e-6)
    assert (exact < 0).all()


def test_pixelcnn_sampler_rows_so_far_equal_the_full_pass():
    """The sampler runs the net on rows 0..i only; that must give the full pass's logits for those rows."""
    torch.manual_seed(0)
    model = build_model("pixelcnn", input_shape=[1, 7, 7], channels=8, layers=3).eval()
    x = torch.rand(2, 1, 7, 7)
    with torch.no_grad():
        full = model.logits(x)
        for r in range(7):
            torch.testing.assert_close(model.net(x[:, :, : r + 1]), full[:, :, : r + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["pixelcnn", "vqvae"])
def test_sampling_is_reproducible_and_seed_dependent(variant):
    torch.manual_seed(0)
    model = build_model(variant, input_shape=[1, 8, 8]).eval()
    assert cap.AUTOREGRESSIVE in capabilities_of(model)
    assert model.sample_steps == (64 if variant == "pixelcnn" else 4)  # 8x8 pixels; a 2x2 code grid
    a = model.sample(4, generator=torch.Generator().manual_seed(7))
    b = model.sample(4, generator=torch.Generator().manual_seed(7))
    c = model.sample(4, generator=torch.Generator().manual_seed(8))
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    if variant == "pixelcnn":
        assert set(a.unique().tolist()) <= {0.0, 1.0}  # binary images
    else:
        assert ((a >= 0) & (a <= 1)).all()


def test_vqvae_codes_and_prior_likelihood():
    """encode_indices gives (B, h, w) int64 in [0, K); decode_indices of them equals the reconstruction; the
    prior's log-probabilities of a grid sum per-position log-softmaxes (checked one position at a time)."""
    torch.manual_seed(0)
    model = build_model("vqvae", input_shape=[1, 8, 8], codebook_size=6).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        idx = model.encode_indices(x)
        assert idx.shape == (3, 2, 2) and idx.dtype == torch.int64 and 0 <= idx.min() and idx.max() < 6
        torch.testing.assert_close(model.decode_indices(idx), model.reconstruct(x))
        total = torch.zeros(3)
        for p in range(4):
            ctx = idx.clone().flatten(1)
            ctx[:, p:] = torch.randint(6, ctx[:, p:].shape)  # the future: noise
            logits = model.prior_logits(ctx.view_as(idx)).flatten(2)[:, :, p]  # (3, K)
            total += logits.log_softmax(1).gather(1, idx.flatten(1)[:, p:p + 1]).squeeze(1)
        torch.testing.assert_close(model.prior_log_prob(idx), total, atol=1e-5, rtol=1e-6)


def test_straight_through_gradient_reaches_the_encoder():
    """With beta = 0 the encoder's output receives exactly the gradient the decoder's input got (the identity
    straight through the quantiser), and every encoder parameter gets a non-zero gradient."""
    torch.manual_seed(0)
    model = build_model("vqvae", input_shape=[1, 8, 8], beta=0.0).train()
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, args, out=None):
            t = out if out is not None else args[0]
            t.retain_grad()
            seen[name] = t
        return hook

    model.encoder.register_forward_hook(keep("z_e"))
    model.decoder.register_forward_pre_hook(keep("dec_in"))
    x = torch.rand(4, 1, 8, 8)
    model(x, stage="vq")  # first training call: data-dependent codebook start
    model.zero_grad()
    terms = model(x, stage="vq")
    terms["loss"].backward()
    assert seen["z_e"].grad is not None and seen["z_e"].grad.abs().sum() > 0
    torch.testing.assert_close(seen["z_e"].grad, seen["dec_in"].grad)
    assert not torch.equal(seen["dec_in"], seen["z_e"])  # the decoder did get quantised vectors
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches encoder.{name}"
    # the vq stage leaves the prior alone
    assert all(p.grad is None for m in (model.prior, model.prior_embedding) for p in m.parameters())


def test_ema_codebook_update_matches_a_hand_computation():
    """K=2, D=1, decay 0.5: entries at 0 and 10, vectors 1, 2, 9 -> counts (2, 1), sums (3, 9);
    EMA counts 0.5*(1, 1) + 0.5*(2, 1) = (1.5, 1), sums 0.5*(0, 10) + 0.5*(3, 9) = (1.5, 9.5);
    Laplace-smoothed counts (c + eps) / (n + K eps) * n with n = 2.5; codebook = sums / smoothed counts."""
    eps = 1e-5
    q = EMAQuantizer(2, 1, decay=0.5, eps=eps, dead_threshold=0.0)
    q.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    q.ema_sum.copy_(q.codebook)
    q.initialised.fill_(1)  # the hand case starts from these entries, not from the data
    z = torch.tensor([[1.0], [2.0], [9.0]])
    idx = q.indices(z)
    assert idx.tolist() == [0, 0, 1]
    q.update(z, idx)
    torch.testing.assert_close(q.ema_count, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(q.ema_sum, torch.tensor([[1.5], [9.5]]))
    n = 2.5
    smoothed = (torch.tensor([1.5, 1.0]) + eps) / (n + 2 * eps) * n
    torch.testing.assert_close(q.codebook, torch.tensor([[1.5], [9.5]]) / smoothed.unsqueeze(1))
    torch.testing.assert_close(q.codebook, torch.tensor([[1.0], [9.5]]), atol=1e-4, rtol=0)
    assert float(q.vectors_seen) == 3.0


def test_ema_updates_only_in_training_and_restarts_dead_entries():
    torch.manual_seed(0)
    model = build_model("vqvae", input_shape=[1, 8, 8], codebook_size=4)
    x = torch.rand(8, 1, 8, 8)
    before = model.quantizer.codebook.clone()
    model.eval()
    model(x, stage="vq")
    assert torch.equal(model.quantizer.codebook, before) and float(model.quantizer.vectors_seen) == 0
    model.train()
    model(x, stage="vq")
    assert not torch.equal(model.quantizer.codebook, before) and float(model.quantizer.vectors_seen) == 32
    model(x, stage="prior")  # the prior stage never moves the codebook
    assert float(model.quantizer.vectors_seen) == 32
    # An entry nobody chooses decays below 1% of a uniform share and is restarted on a vector of the batch.
    q = EMAQuantizer(3, 1, decay=0.5, dead_threshold=0.01)
    q.codebook.copy_(torch.tensor([[0.0], [1.0], [100.0]]))
    q.ema_sum.copy_(q.codebook)
    q.initialised.fill_(1)
    z = torch.tensor([[0.1], [0.9], [0.2], [1.1]])
    restarted = []
    for _ in range(12):  # entry 2's count halves every step: ~7 steps to fall under 1% of a third
        restarted.append(q.update(z, q.indices(z)))
        if restarted[-1]:
            assert float(q.codebook[2]) in z.flatten().tolist()  # placed on one of the batch's vectors
    assert sum(restarted) == 1 and restarted.index(1) >= 5 and restarted[-1] == 0


def test_perplexity_counts_codes_in_use():
    assert float(perplexity(torch.arange(8), 8)) == pytest.approx(8.0)
    assert float(perplexity(torch.zeros(10, dtype=torch.long), 8)) == pytest.approx(1.0)
    assert float(perplexity(torch.tensor([0, 1, 0, 1]), 8)) == pytest.approx(2.0)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_codebook_is_synchronised_across_two_ray_workers(ray_local, tmp_path):
    """2 Ray Train workers, 1 epoch of each stage: after every epoch both workers hold bit-identical weights
    AND buffers (codebook included: weights_sha hashes the whole state_dict), and the codebook counted the
    vectors of both shards (vectors_seen = steps x 2 workers x 64 images x 4 positions), not one worker's."""
    from raeflow.config import RunConfig
    from raeflow.io import load_model
    from raeflow.train.rundir import RunDir
    from raeflow.train.run import train

    out = tmp_path / "run"
    cfg = RunConfig(variant="vqvae", output=str(out))
    cfg.data.dataset = "digits"
    cfg.train.stage_epochs = {"vq": 1, "prior": 1}
    cfg.ray.workers = 2
    train(cfg, log=lambda *_: None)
    rows = RunDir(out).read_metrics()
    assert [r["stage"] for r in rows] == ["vq", "prior"]
    for r in rows:
        assert r["workers"] == 2 and r["weights_in_sync"], f"workers diverged: {r}"
    model = load_model(out)
    steps = rows[0]["steps"]
    assert float(model.quantizer.vectors_seen) == steps * 2 * 64 * 4
    assert math.isfinite(rows[0]["train_perplexity"]) and rows[0]["train_perplexity"] > 1
    assert Path(out).is_dir()


# ------------------------------------------------------------------ the same under DDP, without Ray (seconds)
def _ddp_worker(rank: int, world: int, port: int, state: dict, batches: torch.Tensor, out: str) -> None:
    """One of two gloo processes: DDP-wrap the model exactly as raeflow.train.ray_engine does (default buffer
    broadcast, find_unused_parameters) and take vq-stage steps on this rank's half of each batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = build_model("vqvae", input_shape=[1, 8, 8], codebook_size=8, dead_threshold=0.0)
        model.load_state_dict(state)
        model.train()
        ddp = DDP(model, find_unused_parameters=True)
        opt = torch.optim.SGD([p for n, p in model.named_parameters() if n.startswith(("encoder", "decoder"))],
                              lr=0.05)
        half = batches.shape[1] // world
        for b in batches:
            opt.zero_grad()
            ddp(b[rank * half:(rank + 1) * half], stage="vq")["loss"].backward()
            opt.step()
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)  # two spawned interpreters: ~10 s on a quiet machine, 155 s measured at load 30
def test_codebook_ema_is_all_reduced_under_ddp(tmp_path):
    """Two DDP processes, each on its half of every batch, end with the codebook (and weights) of ONE process
    that saw whole batches: the EMA counts and sums are summed over both shards before each update. Without
    the all-reduce, rank 1 would keep its own codebook after the last step and both would count half the
    vectors. (The Ray test below shows the same through `raeflow train`; this one takes seconds.)"""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    ref = build_model("vqvae", input_shape=[1, 8, 8], codebook_size=8, dead_threshold=0.0)
    ref.quantizer.initialised.fill_(1)  # the data-dependent start picks rank 0's rows: skip it here
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    batches = torch.rand(3, 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, state, batches, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
    ref.train()
    opt = torch.optim.SGD([p for n, p in ref.named_parameters() if n.startswith(("encoder", "decoder"))], lr=0.05)
    for b in batches:  # one process, whole batches
        opt.zero_grad()
        ref(b, stage="vq")["loss"].backward()
        opt.step()
    assert float(r0["quantizer.vectors_seen"]) == float(ref.quantizer.vectors_seen) == 3 * 16 * 4
    for k in ("quantizer.codebook", "quantizer.ema_count", "quantizer.ema_sum"):
        torch.testing.assert_close(r0[k], ref.state_dict()[k], atol=1e-5, rtol=1e-5)
