"""``raeflow export RUN_DIR --format onnx``: the model's deterministic graphs as ONNX, for onnxruntime.

Which graphs are written follows from what the model declares (:func:`raeflow.models.capabilities.capabilities_of`),
never from its variant name:

    ENCODE      -> encoder.onnx      x (B, *input_shape) -> z (B, latent_dim)   (posterior mean when probabilistic)
    RECONSTRUCT -> decoder.onnx      z (B, latent_dim)   -> x (B, *input_shape)
                   reconstruct.onnx  x                   -> x_hat
    DENOISE     -> denoise.onnx      noisy x             -> clean estimate
    CLASSIFY    -> classifier.onnx   x                   -> logits (B, num_classes)

Samplers (GENERATE, AUTOREGRESSIVE) draw random numbers and stay in raeflow. Every graph has a dynamic batch
axis ``B``; inputs are float32 named ``x`` (``z`` for the decoder), the output ``y``. The model is exported in
eval mode, so training-time corruption and dropout are off: the graphs are deterministic.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from raeflow.models import capabilities as cap
from raeflow.models.capabilities import capabilities_of
from raeflow.errors import InputError

FORMATS = ("onnx",)
OPSET = 17


class _Method(nn.Module):
    """One method of the model as a module's forward (what the exporter traces)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


def graphs_for(model: nn.Module) -> dict[str, tuple[str, str]]:
    """{file stem: (method, input name)} for what ``model`` declares, in a fixed order."""
    caps = capabilities_of(model)
    out: dict[str, tuple[str, str]] = {}
    if cap.ENCODE in caps:
        out["encoder"] = ("encode", "x")
    if cap.RECONSTRUCT in caps:
        out["decoder"] = ("decode", "z")
        out["reconstruct"] = ("reconstruct", "x")
    if cap.DENOISE in caps:
        out["denoise"] = ("denoise", "x")
    if cap.CLASSIFY in caps:
        out["classifier"] = ("predict", "x")
    return out


def export_onnx(run_dir: str | Path, out_dir: str | Path | None = None, *,
                log: Callable[[str], None] = print) -> dict[str, Path]:
    """Write one ONNX graph per declared deterministic capability into ``out_dir`` (default RUN_DIR/onnx) and
    check each against the model in onnxruntime on a batch of 3; returns {graph name: path}."""
    from raeflow.io import load_model, model_dir

    src = model_dir(run_dir)
    model = load_model(src).eval()
    out = Path(out_dir) if out_dir else src.parent / "onnx"
    out.mkdir(parents=True, exist_ok=True)
    graphs = graphs_for(model)
    if not graphs:
        raise InputError(f"{src}: declares {sorted(capabilities_of(model))}, none of which is a deterministic graph")
    written: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    for name, (method, arg) in graphs.items():
        shape = (model.latent_dim,) if arg == "z" else tuple(model.input_shape)
        example = torch.rand((2, *shape), generator=g)  # batch 2: a batch of 1 could be specialised away
        path = out / f"{name}.onnx"
        try:
            with torch.no_grad():
                # The TorchScript exporter: needs only `onnx` (the dynamo exporter would add onnxscript).
                torch.onnx.export(_Method(model, method), (example,), str(path), input_names=[arg],
                                  output_names=["y"], dynamic_axes={arg: {0: "B"}, "y": {0: "B"}},
                                  opset_version=OPSET, dynamo=False)
        except torch.onnx.errors.UnsupportedOperatorError as e:
            # e.g. max-unpooling (a CAE with unpool="max" reconstructs through aten::max_unpool2d): said, not hidden
            skipped[name] = str(e).split("\n")[0]
            path.unlink(missing_ok=True)
            log(f"{name}: not exportable to ONNX ({skipped[name]}); it stays in raeflow")
            continue
        written[name] = path
    if not written:
        raise InputError(f"{src}: no graph could be exported: {skipped}")
    _check(model, written, graphs)
    (out / "export.json").write_text(json.dumps(
        {"format": "onnx", "opset": OPSET, "model": str(src), "input_shape": list(model.input_shape),
         "latent_dim": model.latent_dim, "graphs": {n: {"method": m, "input": a, "file": written[n].name}
                                                    for n, (m, a) in graphs.items() if n in written},
         "skipped": skipped}, indent=2))
    if (src / "README.md").is_file():
        from raeflow.modelcard import write_model_card

        write_model_card(src.parent)  # the card lists the exported graphs
    log(f"exported {', '.join(p.name for p in written.values())} to {out}")
    return written


@torch.no_grad()
def _check(model: nn.Module, written: dict[str, Path], graphs: dict[str, tuple[str, str]]) -> None:
    """Each graph run in onnxruntime on a batch size it was not traced with, against the model itself."""
    import numpy as np
    import onnxruntime as ort

    g = torch.Generator().manual_seed(1)
    for name, path in written.items():
        method, arg = graphs[name]
        shape = (model.latent_dim,) if arg == "z" else tuple(model.input_shape)
        x = torch.rand((3, *shape), generator=g)
        want = getattr(model, method)(x).numpy()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {arg: x.numpy()})[0]
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-5, rtol=0):
            raise RuntimeError(f"{path.name}: onnxruntime disagrees with {method}() "
                               f"(max |diff| {np.abs(got - want).max():.2e}); not a faithful export")
