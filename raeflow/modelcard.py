"""The model card: ``model/README.md``, written from the same facts as ``config.json``, ``run.yaml`` and
``eval/*.json`` (nothing typed by hand, so it cannot drift from them).

``train`` writes it after saving the model; ``raeflow eval`` rewrites it with the headline figures; ``raeflow
export`` adds the ONNX files it wrote. It says: what the model is (variant, capabilities, architecture), what it
was trained on (data, split, preprocessing), how (the recipe and the epoch kept), how well (eval), and how to load
it with raeflow, run it with onnxruntime and serve it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import raeflow

CARD = "README.md"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def headline_figures(eval_dir: Path) -> list[tuple[str, str, str]]:
    """(dataset, task.figure, value) of every eval JSON's scalar figures (per-row tables left out)."""
    out = []
    for f in sorted(Path(eval_dir).glob("eval-*.json")):
        try:
            res = json.loads(f.read_text())
        except ValueError:
            continue
        for task, r in (res.get("tasks") or {}).items():
            if not isinstance(r, dict):
                continue
            for k, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("n",):
                    out.append((str(res.get("dataset", f.stem)), f"{task}.{k}", _fmt(v)))
    return out


def _engine(run_dir: Path, workers: int) -> str:
    # Ray runs keep Ray Train's own checkpoint layout in ray/ (raeflow.train.rundir), in-process runs checkpoints/.
    return f"Ray Train, {workers} worker(s)" if (run_dir / "ray").exists() else "in-process (`--local`)"


def card_text(run_dir: str | Path) -> str:
    """The card of the run directory ``run_dir`` (holding model/ and usually run.yaml, metrics.jsonl, eval/)."""
    from raeflow.io import read_config
    from raeflow.models.capabilities import capabilities_of
    from raeflow.registry import build_model

    run_dir = Path(run_dir)
    mdir = run_dir / "model"
    cfg = read_config(mdir)
    model = build_model(cfg["variant"], **cfg["model"])  # weights are not needed to describe it
    caps = sorted(capabilities_of(model))
    n_params = sum(p.numel() for p in model.parameters())
    data = cfg.get("data") or {}
    lines = [f"# {run_dir.name}: {cfg['variant']} (raeflow {cfg.get('raeflow_version', raeflow.__version__)})", "",
             f"- **variant**: `{cfg['variant']}`; capabilities: {', '.join(f'`{c}`' for c in caps)}",
             f"- **parameters**: {n_params:,}",
             "- **architecture** (`config.json` → `model`, the constructor's arguments):", "",
             "```json", json.dumps(cfg["model"], indent=1, sort_keys=True), "```", ""]
    lines += ["## Data", "",
              f"- dataset: `{data.get('name', '?')}` ({data.get('kind', '?')}), input shape "
              f"{tuple(data.get('input_shape', model.input_shape))}",
              f"- preprocessing: {data.get('preprocessing', 'not recorded')}"]
    if data.get("classes"):
        lines.append(f"- classes ({len(data['classes'])}): {', '.join(map(str, data['classes'][:20]))}"
                     + (" …" if len(data["classes"]) > 20 else ""))
    run_yaml = run_dir / "run.yaml"
    if run_yaml.is_file():
        from raeflow.config import RunConfig

        rc = RunConfig.from_yaml(run_yaml)
        t = rc.train
        val = rc.data.val_size if rc.data.val_size is not None else "5,000 (10% of small sets)"
        lines += [f"- split: validation = the last {val} rows of the training split; test = the dataset's own", "",
                  "## Recipe", "",
                  f"- optimiser {t.optimizer}, lr {t.lr}, batch {t.batch_size}, schedule {t.schedule}, weight decay "
                  f"{t.weight_decay}, epochs {t.epochs}" + (f", stages {dict(t.stage_epochs)}" if t.stage_epochs
                                                            else "") + f", seed {t.seed}",
                  f"- engine: {_engine(run_dir, rc.ray.workers)} (the full config: `../run.yaml`)"]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(r) for r in metrics.read_text().splitlines() if r.strip()]
        best = next((r for r in reversed(rows) if r.get("best")), rows[-1] if rows else None)
        if best:
            sel = model.selection_metric
            value = best.get(sel, best.get(sel.replace("val_", "train_")))
            lines.append(f"- kept epoch {best['epoch']} of {len(rows)} (by `{sel}` = {_fmt(value)})")
    figures = headline_figures(run_dir / "eval")
    lines += ["", "## Evaluation", ""]
    if figures:
        lines += ["| dataset | figure | value |", "|---|---|---|", *[f"| {d} | {k} | {v} |" for d, k, v in figures]]
    else:
        lines.append(f"Not evaluated yet: `raeflow eval -m {run_dir}` adds the figures here.")
    onnx = sorted((run_dir / "onnx").glob("*.onnx")) if (run_dir / "onnx").is_dir() else []
    shape = ", ".join(str(s) for s in model.input_shape)
    lines += ["", "## Use", "", "With raeflow:", "", "```python", "from raeflow.io import load_model",
              f"model = load_model(\"{run_dir}\")  # eval mode; input (B, {shape}) in [0, 1]"]
    if "encode" in caps:
        lines.append("codes = model.encode(x)  # (B, latent_dim)")
    if "reconstruct" in caps:
        lines.append("x_hat = model.reconstruct(x)")
    if "generate" in caps:
        lines.append("samples = model.sample(16)")
    lines += ["```", "", "With onnxruntime (after `raeflow export " + str(run_dir) + " --format onnx`; deterministic "
              "graphs only, samplers stay in raeflow):", "", "```python", "import numpy as np, onnxruntime as ort",
              f"sess = ort.InferenceSession(\"{run_dir}/onnx/{onnx[0].name if onnx else 'encoder.onnx'}\")",
              f"out = sess.run(None, {{\"x\": x.astype(np.float32)}})[0]  # x: (B, {shape}), any B",
              "```"]
    if onnx:
        lines.append("Exported: " + ", ".join(f"`onnx/{p.name}`" for p in onnx))
    lines += ["", "Serve it over HTTP (Ray Serve; `GET /models` lists the endpoints its capabilities give):", "",
              "```", f"raeflow serve --model {run_dir}", "```", ""]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path) -> Path:
    """Write ``run_dir/model/README.md``; returns its path."""
    path = Path(run_dir) / "model" / CARD
    path.write_text(card_text(run_dir))
    return path
