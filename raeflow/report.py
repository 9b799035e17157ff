"""``raeflow report RUN_DIR [RUN_DIR ...] -o report.html``: one self-contained HTML page for one or more runs.

Everything is in the file: the run's plots and the comparison figures are PNGs embedded as ``data:`` URIs, the
style sheet is inline, there is no script and no link to anything on the network, so the page opens the same
from a laptop, a CI artifact or an e-mail. Tables and figures come from each run's ``run.yaml``,
``metrics.jsonl`` and ``eval/*.json``; several runs sit side by side, one column each.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence
from raeflow.errors import InputError, MissingFileError

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;color:#222;
padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.runs{display:grid;grid-template-columns:repeat(var(--n),minmax(0,1fr));gap:1.2em}
.run{border:1px solid #e2e2e2;border-radius:6px;padding:.6em}
figure{margin:.6em 0}figcaption{font-size:.85em;color:#555}img{max-width:100%;height:auto;display:block}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:.5em}code{background:#f4f4f4;padding:0 .2em}
"""

# The plots a run directory may hold, in the order shown (latent views side by side: PCA and t-SNE).
PLOTS = [("loss.png", "loss per epoch"), ("reconstructions.png", "reconstructions"),
         ("latent.png", "latent space (PCA)"), ("latent_tsne.png", "latent space (t-SNE)"),
         ("latent_grid.png", "decoded 2-D latent grid"), ("samples.png", "samples from the prior (seed 0)")]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, caption: str) -> str:
    return (f'<figure><img src="{_data_uri(png)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "–"
    return html.escape(str(v))


def read_run(path: str | Path) -> dict[str, Any]:
    """What the page shows of one run directory (raises FileNotFoundError when it is not one)."""
    p = Path(path)
    if not (p / "metrics.jsonl").is_file() and not (p / "model").is_dir():
        raise MissingFileError(f"{p} is not a raeflow run directory (no metrics.jsonl, no model/)")
    rows = [json.loads(r) for r in (p / "metrics.jsonl").read_text().splitlines() if r.strip()] \
        if (p / "metrics.jsonl").is_file() else []
    cfg: dict[str, Any] = {}
    if (p / "run.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((p / "run.yaml").read_text()) or {}
    evals = {}
    for f in sorted((p / "eval").glob("eval-*.json")) if (p / "eval").is_dir() else []:
        try:
            evals[f.stem] = json.loads(f.read_text())
        except ValueError:
            continue
    return {"name": p.name, "path": p, "rows": rows, "config": cfg, "evals": evals}


def _summary(run: dict[str, Any]) -> dict[str, str]:
    rows, cfg = run["rows"], run["config"]
    best = next((r for r in reversed(rows) if r.get("best")), rows[-1] if rows else {})
    wall = sum(r.get("epoch_s", 0.0) for r in rows)
    return {"variant": cfg.get("variant", "?"), "dataset": str((cfg.get("data") or {}).get("dataset", "?")),
            "epochs": str(len(rows)), "kept epoch": str(best.get("epoch", "–")),
            "train_loss (kept)": _fmt(best.get("train_loss", math.nan)),
            "val_loss (kept)": _fmt(best.get("val_loss", math.nan)),
            "val_error (kept)": _fmt(best.get("val_error", math.nan)) if "val_error" in best else "–",
            "training s (sum of epochs)": f"{wall:.1f}"}


def _eval_figures(run: dict[str, Any]) -> dict[str, float]:
    out = {}
    for res in run["evals"].values():
        for task, r in (res.get("tasks") or {}).items():
            for k, v in (r.items() if isinstance(r, dict) else []):
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n":
                    out[f"{res.get('dataset', '?')}: {task}.{k}"] = float(v)
    return out


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def comparison_figure(runs: list[dict[str, Any]]) -> bytes | None:
    """Validation (else training) loss per epoch of every run on one axis, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    drawn = False
    for run in runs:
        rows = run["rows"]
        for ax, key in zip(axes, ("train_loss", "val_loss")):
            pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=run["name"])
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, key in zip(axes, ("train_loss", "val_loss")):
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.set_yscale("symlog")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def render(run_dirs: Sequence[str | Path], *, title: str | None = None,
           extra_images: Sequence[tuple[str, str | Path]] = (), notes: Sequence[str] = ()) -> str:
    """The page as a string. ``extra_images``: (caption, PNG path) shown after the runs (showcase: served
    results); ``notes``: paragraphs of plain text shown under the title."""
    runs = [read_run(p) for p in run_dirs]
    if not runs:
        raise InputError("raeflow report needs at least one run directory")
    title = title or ("raeflow report: " + ", ".join(r["name"] for r in runs))
    parts = [f"<h1>{html.escape(title)}</h1>", *[f"<p>{html.escape(n)}</p>" for n in notes]]

    summaries = [_summary(r) for r in runs]
    keys = list(summaries[0])
    parts += ["<h2>Runs</h2>", _table(["", *[r["name"] for r in runs]],
                                      [[html.escape(k), *[s[k] for s in summaries]] for k in keys])]
    figs = [_eval_figures(r) for r in runs]
    names = sorted({k for f in figs for k in f})
    if names:
        parts += ["<h2>Evaluation</h2>",
                  _table(["figure", *[r["name"] for r in runs]],
                         [[html.escape(n), *[_fmt(f.get(n, math.nan)) for f in figs]] for n in names])]
    comp = comparison_figure(runs)
    if comp is not None:
        parts += ["<h2>Loss curves</h2>", _img(comp, "loss per epoch, every run (symlog scale)")]

    cols = []
    for r in runs:
        imgs = {name: (r["path"] / "plots" / name) for name, _ in PLOTS}
        body = [f"<h3>{html.escape(r['name'])}</h3>", f"<p><code>{html.escape(str(r['path']))}</code></p>"]
        latent = [(n, c) for n, c in PLOTS if n.startswith("latent") and n != "latent_grid.png" and imgs[n].is_file()]
        for name, caption in PLOTS:
            if not imgs[name].is_file() or (name, caption) in latent:
                continue
            body.append(_img(imgs[name].read_bytes(), caption))
        if latent:  # PCA and t-SNE views next to each other
            body.append('<div class="pair">' + "".join(_img(imgs[n].read_bytes(), c) for n, c in latent) + "</div>")
        cols.append(f'<div class="run">{"".join(body)}</div>')
    parts += ["<h2>Plots</h2>", f'<div class="runs" style="--n:{len(runs)}">{"".join(cols)}</div>']
    extra = [(c, Path(p)) for c, p in extra_images if Path(p).is_file()]
    if extra:
        parts += ["<h2>More</h2>", *[_img(p.read_bytes(), c) for c, p in extra]]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            # data: images only; no script, no request leaves the page
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            "<link rel=\"icon\" href=\"data:,\">"  # a browser otherwise asks the server for /favicon.ico
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(run_dirs: Sequence[str | Path], output: str | Path = "report.html", **kw: Any) -> Path:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(run_dirs, **kw), encoding="utf-8")
    return out
