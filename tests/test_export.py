"""`raeflow export --format onnx`: graphs chosen from declared capabilities, run in onnxruntime on real MNIST test
images at several batch sizes (the batch axis is dynamic), matching raeflow's own outputs to 1e-5."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

VARIANTS = {  # name: (variant, constructor arguments)
    "dae": ("dae", {"hidden": [128], "latent_dim": 16}),  # encode, reconstruct, denoise
    "vae": ("vae", {"hidden": [128], "latent_dim": 8}),  # encode (posterior mean), reconstruct; its sampler stays
    # convolutions, pooling and unpooling (nearest: the exporter has no aten::max_unpool2d, see the next test)
    "cae": ("cae", {"channels": [8, 16], "latent_dim": 16, "unpool": "nearest"}),
}


@pytest.fixture(scope="module")
def mnist_test() -> np.ndarray:
    from raeflow.data.images import load_mnist

    return load_mnist("test").x[:256]  # (256, 1, 28, 28) real test images


def _trained(variant: str, kwargs: dict, tmp_path):
    """A model given 30 Adam steps on 1,920 MNIST training images (real weights, not the initial ones), saved as
    a run directory's model/."""
    from raeflow.data.images import load_mnist
    from raeflow.io import save_model
    from raeflow.registry import build_model

    torch.manual_seed(0)
    model = build_model(variant, input_shape=[1, 28, 28], **kwargs)
    x = torch.from_numpy(load_mnist("train").x[:1920])
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for i in range(30):
        opt.zero_grad()
        model(x[i * 64:(i + 1) * 64])["loss"].backward()
        opt.step()
    model.eval()
    save_model(model, tmp_path / "run" / "model", data={"name": "mnist", "input_shape": [1, 28, 28]})
    return tmp_path / "run"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_onnx_graphs_match_raeflow(name, mnist_test, tmp_path):
    import onnxruntime as ort

    from raeflow.export import export_onnx
    from raeflow.io import load_model
    from raeflow.models.capabilities import capabilities_of

    variant, kwargs = VARIANTS[name]
    run = _trained(variant, kwargs, tmp_path)
    written = export_onnx(run, log=lambda *_: None)
    model = load_model(run)
    caps = capabilities_of(model)
    expected = {"encoder", "decoder", "reconstruct"} | ({"denoise"} if "denoise" in caps else set())
    assert set(written) == expected  # from the declaration: a VAE gets no denoise graph, nobody a sampler
    assert json.loads((run / "onnx" / "export.json").read_text())["graphs"]["encoder"]["method"] == "encode"
    x = torch.from_numpy(mnist_test)
    with torch.no_grad():
        z = model.encode(x)
        want = {"encoder": (x, z), "decoder": (z, model.decode(z)), "reconstruct": (x, model.reconstruct(x))}
        if "denoise" in written:
            noisy = model.corruption(x, generator=torch.Generator().manual_seed(0))
            want["denoise"] = (noisy, model.denoise(noisy))
    for graph, (inp, out) in want.items():
        sess = ort.InferenceSession(str(written[graph]), providers=["CPUExecutionProvider"])
        arg = sess.get_inputs()[0].name
        for b in (1, 7, 256):  # the batch axis is dynamic: sizes the export never saw
            got = sess.run(None, {arg: inp[:b].numpy()})[0]
            assert got.shape == tuple(out[:b].shape)
            np.testing.assert_allclose(got, out[:b].numpy(), atol=1e-5, rtol=0, err_msg=f"{name}/{graph} batch {b}")


def test_unexportable_graph_is_reported_not_hidden(tmp_path):
    """A CAE that reconstructs through max-unpooling: its encoder and decoder export, its reconstruct graph is
    listed as skipped with the reason (the model itself still reconstructs in raeflow)."""
    from raeflow.export import export_onnx
    from raeflow.io import save_model
    from raeflow.registry import build_model

    torch.manual_seed(0)
    model = build_model("cae", input_shape=[1, 28, 28], channels=[4], latent_dim=8, unpool="max").eval()
    save_model(model, tmp_path / "run" / "model", data={"name": "mnist"})
    written = export_onnx(tmp_path / "run", log=lambda *_: None)
    meta = json.loads((tmp_path / "run" / "onnx" / "export.json").read_text())
    assert set(written) == {"encoder", "decoder"} and "max_unpool2d" in meta["skipped"]["reconstruct"]
    assert not (tmp_path / "run" / "onnx" / "reconstruct.onnx").exists()


def test_export_cli_rejects_unknown_format(tmp_path):
    from typer.testing import CliRunner

    from raeflow.cli.main import app

    r = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "tflite"])
    assert r.exit_code == 2 and "unknown --format" in r.output
