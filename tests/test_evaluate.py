"""`raeflow eval`'s measures, checked against independent computations on small real data (digits)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raeflow.config import RunConfig
from raeflow.data import load_eval_data, load_training_data
from raeflow.io import load_model
from raeflow.evaluate import TASKS, evaluate, kmeans_centres, parzen_log_likelihood, parzen_scores
from raeflow.train.run import train

QUIET = dict(log=lambda s: None)


def _train(tmp_path, name, variant, model, epochs=3, **train_opts):
    cfg = RunConfig(variant=variant, model=model, output=str(tmp_path / name))
    cfg.data.dataset, cfg.train.epochs, cfg.train.threads, cfg.train.lr = "digits", epochs, 1, 3e-3
    cfg.train.batch_size = 32
    for k, v in train_opts.items():
        setattr(cfg.train, k, v)
    train(cfg, local=True, **QUIET)
    return tmp_path / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("eval")
    return {"pca": _train(d, "pca", "pca", {"latent_dim": 8}),
            "vae": _train(d, "vae", "vae", {"hidden": [64], "latent_dim": 4}, epochs=5),
            "dae": _train(d, "dae", "dae", {"hidden": [64], "latent_dim": 16}, epochs=15),
            "sdae": _train(d, "sdae", "sdae", {"hidden": [128, 64]}, stage_epochs={"pretrain": 2, "finetune": 10})}


def test_reconstruction_is_hintons_squared_error_per_image(runs):
    from sklearn.decomposition import PCA

    res = evaluate(runs["pca"], "digits", ["reconstruction"], **QUIET)["tasks"]["reconstruction"]
    train_x = load_training_data("digits").train.x.reshape(-1, 64)
    test_x = load_eval_data("digits:test").x.reshape(-1, 64)
    sk = PCA(8).fit(train_x)
    expected = ((sk.inverse_transform(sk.transform(test_x)) - test_x) ** 2).sum(1).mean()
    # float32 weights vs scikit-learn's float64 SVD: agree to 0.1%; a wrong measure (mean vs sum) is off 64x
    assert res["squared_error_per_image"] == pytest.approx(expected, rel=1e-3)
    assert res["mse_per_pixel"] == pytest.approx(expected / 64, rel=1e-3)


def test_default_tasks_are_those_that_apply(runs):
    assert set(evaluate(runs["pca"], "digits", **QUIET)["tasks"]) == {"reconstruction", "probe", "retrieval"}
    assert set(evaluate(runs["sdae"], "digits", **QUIET)["tasks"]) == {"reconstruction", "probe", "classify",
                                                                        "denoise", "retrieval"}
    with pytest.raises(ValueError, match="does not apply"):
        evaluate(runs["pca"], "digits", ["likelihood"], **QUIET)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(runs["pca"], "digits", ["accuracy"], **QUIET)


def test_probe_and_classify_beat_chance_by_far(runs):
    probe = evaluate(runs["dae"], "digits", ["probe"], **QUIET)["tasks"]["probe"]
    assert probe["linear_probe_accuracy"] > 0.65 and probe["knn_accuracy"] > 0.65  # chance: 0.1
    cls = evaluate(runs["sdae"], "digits", ["classify"], **QUIET)["tasks"]["classify"]
    assert cls["test_error"] < 0.4 and cls["n"] == 300


def test_likelihood_iwae_is_tighter_than_elbo(runs):
    res = evaluate(runs["vae"], "digits", ["likelihood"], {"k": 50}, **QUIET)["tasks"]["likelihood"]
    for proto in ("fixed", "dynamic"):
        nll, elbo = res[proto]["nll"], res[proto]["elbo"]
        assert 0 < nll <= -elbo + 0.5  # the k-sample bound is at least as tight as the ELBO (up to MC noise)
    # grey-level BCE + KL per image is the model's own training loss on the (unbinarised) test images
    model = load_model(runs["vae"]).eval()
    x = torch.from_numpy(load_eval_data("digits:test").x)
    with torch.no_grad():
        torch.manual_seed(0)
        loss = float(model(x)["loss"])
    assert res["grey"]["bce_plus_kl"] == pytest.approx(loss, rel=0.05)


def test_likelihood_can_run_one_binarisation_protocol(runs):
    fixed = evaluate(runs["vae"], "digits", ["likelihood"], {"k": 5, "binarisation": "fixed"}, **QUIET)
    assert {"fixed", "grey"} <= set(fixed["tasks"]["likelihood"]) and "dynamic" not in fixed["tasks"]["likelihood"]
    with pytest.raises(ValueError, match="binarisation"):
        evaluate(runs["vae"], "digits", ["likelihood"], {"binarisation": "once"}, **QUIET)


def test_parzen_matches_a_direct_gaussian_mixture_density():
    g = torch.Generator().manual_seed(0)
    samples, x = torch.rand(50, 3, generator=g).double(), torch.rand(7, 3, generator=g).double()
    sigma = 0.3
    ours = parzen_log_likelihood(samples, x, sigma, chunk=3)
    comp = torch.distributions.Independent(torch.distributions.Normal(samples, sigma), 1)
    direct = torch.logsumexp(comp.log_prob(x[:, None, :]), 1) - math.log(50)
    torch.testing.assert_close(ours, direct)
    # every sigma of a grid from one pass over the distances: the per-sigma means, chunked or not
    sigmas = [0.1, 0.3, 1.0]
    np.testing.assert_allclose(parzen_scores(samples, x, sigmas, chunk=2),
                               [float(parzen_log_likelihood(samples, x, s).mean()) for s in sigmas], rtol=1e-12)


def test_kmeans_centres_find_separated_clusters():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = np.concatenate([m + 0.1 * rng.standard_normal((200, 2)) for m in means])
    c = kmeans_centres(x, 3)
    assert c.shape == (3, 2)
    d = np.linalg.norm(c[:, None] - means[None], axis=-1)  # (3 centres, 3 means)
    assert sorted(d.argmin(1)) == [0, 1, 2] and d.min(1).max() < 0.05, c


def test_parzen_task_and_denoise_task(runs):
    par = evaluate(runs["vae"], "digits", ["parzen"], {"parzen_samples": 2000}, **QUIET)["tasks"]["parzen"]
    # the standard protocol's grid (Goodfellow's parzen_ll.py), sigma the held-out argmax
    np.testing.assert_allclose(par["sigma_grid"], np.logspace(-1, 0, 10))
    assert par["sigma"] == par["sigma_grid"][int(np.argmax(par["held_out_scores"]))] and np.isfinite(par["log_likelihood"])
    base = par["kmeans_baseline"]  # digits' train split has fewer rows than 2,000 centres: every other row a centre
    assert base["centres"] == len(load_eval_data("digits:train").x) - par["held_out"] and np.isfinite(base["log_likelihood"])
    den = evaluate(runs["dae"], "digits", ["denoise"], **QUIET)["tasks"]["denoise"]
    masking = [r for r in den["rows"] if r["noise"] == "masking"]
    assert all(r["denoised_psnr"] > r["noisy_psnr"] for r in masking)  # the DAE was trained on masking noise
    assert set(TASKS) >= {"reconstruction", "probe", "classify", "likelihood", "parzen", "denoise", "retrieval"}


@pytest.mark.parametrize("dim,how", [(1, "code (y: example index)"), (2, "code"), (5, "PCA of code")])
def test_latent_scatter_draws_codes_of_any_width(tmp_path, dim, how):
    """A 1-d code used to raise IndexError at the end of training (found by a tune grid over latent_dim)."""
    from raeflow.models.ae import DenseAE
    from raeflow.plots import latent_scatter

    x = load_eval_data("digits:test").x[:50]
    model = DenseAE(input_shape=(1, 8, 8), latent_dim=dim, hidden=(16,)).eval()
    assert latent_scatter(model, x, np.arange(50) % 10, tmp_path / "latent.png") == how
    assert (tmp_path / "latent.png").stat().st_size > 1000


def _load_job(name: str):
    """A script of jobs/ as a module (jobs/ is not a package: `ray job submit` runs them as files)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_parzen_select_job_chooses_the_kept_epoch_with_the_best_validation_score(runs, tmp_path, monkeypatch):
    """jobs/parzen_select.py scores each kept checkpoint on the validation split (never the test split) and
    writes the best one's weights as a model `raeflow eval` can measure."""
    import json
    import sys

    from raeflow.train.rundir import load_checkpoint

    job = _load_job("parzen_select")
    out = tmp_path / "sel.json"
    monkeypatch.setattr(sys, "argv", ["parzen_select", str(runs["vae"]), "--samples", "500", "--json", str(out),
                                      "--threads", "1"])
    job.main()
    res = json.loads(out.read_text())
    assert [r["epoch"] for r in res["epochs"]] == [4, 5]  # the two checkpoints a run keeps by default
    assert res["validation_images"] == len(load_training_data("digits").val)
    best = max(res["epochs"], key=lambda r: r["val_log_likelihood"])
    assert res["chosen"] == best and all(np.isfinite(r["val_log_likelihood"]) for r in res["epochs"])
    chosen = load_checkpoint(runs["vae"] / "checkpoints" / best["checkpoint"])["model"]
    written = load_model(runs["vae"] / "model-parzen").state_dict()
    assert all(torch.equal(written[k], v) for k, v in chosen.items())

    # --posterior scores the decoded codes of training images beside the prior's samples; --bar is a recipe's rule:
    # the choice is written either way, and the exit status says whether the test split may be measured.
    score = best["val_log_likelihood"]
    for bar, status in ((score - 1.0, None), (score + 1.0, job.BELOW_BAR)):
        monkeypatch.setattr(sys, "argv", ["parzen_select", str(runs["vae"]), "--samples", "500", "--json", str(out),
                                          "--threads", "1", "--posterior", "300", "--bar", str(bar)])
        if status is None:
            job.main()
        else:
            with pytest.raises(SystemExit) as exc:
                job.main()
            assert exc.value.code == status
        res = json.loads(out.read_text())
        assert res["bar"] == bar and res["posterior_samples"] == 300
        assert res["chosen"]["val_log_likelihood"] == pytest.approx(score)  # the same seeded samples
        assert all(np.isfinite(r["posterior_val_log_likelihood"]) for r in res["epochs"])
    # decoded codes of distinct training rows, in the model's data space
    from raeflow.evaluate import posterior_samples

    model = load_model(runs["vae"] / "model-parzen")
    train_x = load_training_data("digits").train.x
    post = posterior_samples(model, train_x, 300)
    assert post.shape == (300, model.input_dim) and post.dtype == torch.float64
    assert torch.equal(post, posterior_samples(model, train_x, 300))  # seeded
    assert len(posterior_samples(model, train_x[:50], 300)) == 50  # never more rows than there are


def test_parzen_probe_job_scores_each_set_of_centres_on_validation(runs, tmp_path, monkeypatch):
    """jobs/parzen_probe.py: each row is the protocol's validation score of one set of window centres (training
    images, decoded codes, moved codes, shrunk reconstructions, the samples); a PCA, which cannot sample, is refused."""
    import json
    import sys

    from raeflow.errors import InputError
    from raeflow.evaluate import parzen_samples, parzen_scores

    job = _load_job("parzen_probe")
    out = tmp_path / "probe.json"
    monkeypatch.setattr(sys, "argv", ["parzen_probe", str(runs["vae"]), "--model", "model", "--n", "300",
                                      "--noise", "0", "0.5", "--shrink", "0", "--json", str(out), "--threads", "1"])
    job.main()
    res = json.loads(out.read_text())
    rows = {r["centres"]: r["val_log_likelihood"] for r in res["rows"]}
    assert list(rows) == ["training images", "decoded codes", "decoded codes + noise 0.0",
                          "decoded codes + noise 0.5", "decoded codes shrunk 0.0", "samples"]
    # noise 0 and shrink 0 leave the decoded codes as they are; noise 0.5 moves them
    assert rows["decoded codes + noise 0.0"] == pytest.approx(rows["decoded codes"])
    assert rows["decoded codes shrunk 0.0"] == pytest.approx(rows["decoded codes"])
    assert rows["decoded codes + noise 0.5"] != pytest.approx(rows["decoded codes"])
    data = load_training_data("digits")
    val = torch.from_numpy(data.val.x.reshape(len(data.val), -1)).double()
    model = load_model(runs["vae"] / "model")
    assert rows["samples"] == pytest.approx(max(parzen_scores(parzen_samples(model, 300), val)))  # the protocol's draws
    space = res["code_space"]
    assert space["codes"] == len(data.train) and 0 < space["code_to_nearest_code_median"]
    assert job.nearest_distances(np.array([[0.0], [1.0], [3.0]]), np.array([[0.0], [1.0], [3.0]]), True).tolist() \
        == [1.0, 1.0, 2.0]
    monkeypatch.setattr(sys, "argv", ["parzen_probe", str(runs["pca"]), "--model", "model", "--threads", "1"])
    with pytest.raises(InputError, match="sample"):
        job.main()


def test_split_difficulty_job_counts_nearest_neighbour_mistakes():
    """jobs/split_difficulty.py: a row is wrong exactly when its nearest reference row has another label."""
    job = _load_job("split_difficulty")
    ref = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = np.array([0, 1, 2])
    x = np.array([[1.0, 1.0], [9.0, 1.0], [1.0, 9.0], [6.0, 0.0]])  # the last sits nearer label 1's row
    assert job.nearest_neighbour_error(ref, labels, x, np.array([0, 1, 2, 0])) == 0.25
    assert job.nearest_neighbour_error(ref, labels, x, np.array([0, 1, 2, 1])) == 0.0
