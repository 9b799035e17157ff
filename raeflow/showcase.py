"""``raeflow showcase``: the whole pipeline on built-in MNIST in a few minutes, ending in a report.

Train a denoising AE and a 2-D VAE on Ray Train, embed the MNIST test set to Parquet with Ray Data, run a
similar-image search, serve both models on Ray Serve and call ``/denoise`` and ``/generate`` over HTTP, then
write ``report.md`` with the figures and plots. One local Ray instance serves every step. The defaults are
sized for a 2-core laptop; ``--epochs``, ``--workers``, ``--hidden`` scale it up for a real run.
"""
from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np
from raeflow.errors import RunExistsError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def showcase(output: str = "runs/showcase", *, epochs: int = 2, workers: int = 2, hidden: list[int] | None = None,
             latent_dim: int = 32, log: Callable[[str], None] = print) -> Path:
    import httpx

    from raeflow.config import RunConfig
    from raeflow.data import load_eval_data
    from raeflow.embed.job import run_embed
    from raeflow.embed.search import search
    from raeflow.evaluate import evaluate
    from raeflow.models.corruption import Corruption
    from raeflow.raycluster import ensure_ray, shutdown_if_started
    from raeflow.serve.run import ServerSpec, start
    from raeflow.train.run import train

    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise RunExistsError(f"{out} exists and is not empty: choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    hidden = hidden or [512, 128]
    figures: dict[str, object] = {}
    t0 = time.perf_counter()
    ensure_ray(owner="showcase", log=log)
    try:
        steps = {}
        # 1-2. Train on Ray Train (data-parallel workers, Ray Data shards, checkpoints in the run directories).
        for name, variant, model in (("dae", "dae", {"hidden": hidden, "latent_dim": latent_dim}),
                                     ("vae", "vae", {"hidden": hidden[:1], "latent_dim": 2})):
            t = time.perf_counter()
            cfg = RunConfig(variant=variant, model=model, output=str(out / name))
            cfg.data.dataset, cfg.train.epochs, cfg.ray.workers = "mnist", epochs, workers
            cfg.plots.projections = ["pca", "tsne"]  # report.html shows both views of the codes
            res = train(cfg, log=log)
            steps[f"train {name}"] = time.perf_counter() - t
            figures[f"{name}_{res.selection_metric}"] = res.best
        ev = evaluate(out / "dae", "mnist", ["reconstruction", "denoise"], {"denoise_n": 1000}, log=log)
        from raeflow.evaluate import save_results

        save_results(ev, out / "dae" / "eval")  # report.html's evaluation table and the model card read it
        from raeflow.modelcard import write_model_card

        write_model_card(out / "dae")
        figures["dae_squared_error_per_image"] = ev["tasks"]["reconstruction"]["squared_error_per_image"]
        masking = next(r for r in ev["tasks"]["denoise"]["rows"] if r["noise"] == "masking" and r["level"] == 0.25)
        figures["dae_psnr_masking25"] = (masking["noisy_psnr"], masking["denoised_psnr"])

        # 3. Embed the MNIST test set with the DAE's encoder on Ray Data.
        t = time.perf_counter()
        summary = run_embed(out / "dae", "mnist:test", out / "embeddings", workers=workers, progress=False, log=log)
        steps["embed mnist:test"] = time.perf_counter() - t
        figures["embedded_rows"] = summary.total_embedded

        # 4. Similar-image search: the 10 nearest test images to a few queries, by cosine similarity of codes.
        queries = [f"mnist:test:{i}" for i in range(5)]
        test = load_eval_data("mnist:test")
        hits = [search(out / "embeddings", out / "dae", q, k=11) for q in queries]
        same = [np.mean([h["label"] == test.classes[test.y[i]] for h in r["hits"][1:]]) for i, r in enumerate(hits)]
        figures["search_precision_at_10"] = float(np.mean(same))
        (out / "search.json").write_text(json.dumps(hits, indent=2))

        # 5. Serve both models on Ray Serve; call /denoise and /generate over real HTTP.
        t = time.perf_counter()
        server = start(ServerSpec(models=[str(out / "dae"), str(out / "vae")], port=_free_port()), log=log)
        try:
            clean = test.x[:16]
            noisy = Corruption("masking", 0.25)(__import__("torch").from_numpy(clean)).numpy()
            r = httpx.post(f"{server.url}/dae/denoise", json={"images": noisy[:, 0].tolist(), "format": "array"},
                           timeout=60)
            r.raise_for_status()
            den = np.asarray(r.json()["images"], np.float32)
            figures["http_denoise_sq_error"] = (float(((noisy[:, 0] - clean[:, 0]) ** 2).sum((1, 2)).mean()),
                                                float(((den - clean[:, 0]) ** 2).sum((1, 2)).mean()))
            for endpoint, body, png in (("dae/denoise", {"images": noisy[:, 0].tolist(), "format": "array",
                                                          "grid": True}, "served_denoised.png"),
                                        ("vae/generate", {"n": 64, "seed": 0, "grid": True}, "served_generated.png")):
                r = httpx.post(f"{server.url}/{endpoint}", json=body, timeout=60)
                r.raise_for_status()
                (out / png).write_bytes(base64.b64decode(r.json()["grid"]))
        finally:
            server.stop()
        steps["serve + requests"] = time.perf_counter() - t
    finally:
        shutdown_if_started(owner="showcase")
    report = write_report(out, figures, steps, time.perf_counter() - t0, epochs, workers)
    from raeflow.report import write_report as write_html  # the same runs as one self-contained page

    write_html([out / "dae", out / "vae"], out / "report.html", title="raeflow showcase: MNIST",
               notes=[line for line in report.read_text().splitlines() if line.startswith("- ")],
               extra_images=[("served /dae/denoise", out / "served_denoised.png"),
                             ("served /vae/generate (64 samples, seed 0)", out / "served_generated.png")])
    log(f"\nshowcase done in {time.perf_counter() - t0:.0f} s: report at {report} and {out / 'report.html'}")
    return report


def write_report(out: Path, f: dict, steps: dict[str, float], wall: float, epochs: int, workers: int) -> Path:
    noisy_psnr, den_psnr = f["dae_psnr_masking25"]
    http_noisy, http_den = f["http_denoise_sq_error"]
    lines = [
        "# raeflow showcase: MNIST", "",
        f"Ray Train ({workers} workers, {epochs} epochs each), Ray Data, Ray Serve; total {wall:.0f} s.", "",
        "| step | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in steps.items()], "",
        "## Figures", "",
        f"- DAE test squared error per image (Hinton & Salakhutdinov's measure): "
        f"{f['dae_squared_error_per_image']:.2f}",
        f"- DAE denoising, masking noise 25%: PSNR {noisy_psnr:.1f} dB noisy -> {den_psnr:.1f} dB denoised",
        f"- over HTTP (`/dae/denoise`, 16 images): squared error {http_noisy:.1f} noisy -> {http_den:.1f} denoised",
        f"- embedded {f['embedded_rows']:,} test images to `embeddings/` (Parquet)",
        f"- similar-image search, same-label precision of the 10 nearest codes (5 queries): "
        f"{f['search_precision_at_10']:.2f}", "",
        "## Plots", "",
        "DAE reconstructions (input / noisy / denoised): ![](dae/plots/reconstructions.png)", "",
        "DAE latent space: ![](dae/plots/latent.png)", "",
        "VAE 2-D latent manifold: ![](vae/plots/latent_grid.png)", "",
        "Served `/dae/denoise` (grid): ![](served_denoised.png)", "",
        "Served `/vae/generate` (64 samples, seed 0): ![](served_generated.png)", "",
        "Search results: `search.json`; runs: `dae/`, `vae/` (metrics.jsonl, model/, plots/).",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
