"""``raeflow finetune``: turn a trained autoencoder's encoder into a classifier and train it on labels.

It builds a :class:`~raeflow.models.classifier.Classifier` whose encoder starts from the trained weights, then
hands it to :func:`raeflow.train.run.train`, so fine-tuning runs on the same engines (in-process with
``local=True``, else Ray Train), writes the same run directory (``model/`` is the classifier; ``metrics.jsonl``
has ``val_error``, by which the epoch kept is chosen) and takes the same ``--set`` overrides as ``train``.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from raeflow.config import RunConfig
from raeflow.data import TrainingData, load_eval_data, validation_size
from raeflow.artifact import TrainedModel
from raeflow.models import capabilities as cap
from raeflow.models.classifier import Classifier
from raeflow.registry import get_variant
from raeflow.train.loop import seed_everything
from raeflow.train.run import TrainResult, train
from raeflow.errors import ConfigError, InputError

#: the keys a fine-tuning run config's ``model`` section may hold: the head built on the encoder (the encoder
#: itself comes from the trained autoencoder)
HEAD_KEYS = ("dropout", "head_hidden")


def head_options(cfg: RunConfig) -> dict[str, Any]:
    """``dropout`` / ``head_hidden`` from a fine-tuning config's ``model`` section (refusing anything else)."""
    unknown = set(cfg.model) - set(HEAD_KEYS)
    if unknown:
        raise ConfigError(f"a fine-tuning config's model section takes only {list(HEAD_KEYS)}; got {sorted(unknown)} "
                          "(the encoder's own settings belong to the autoencoder's config)")
    return {"dropout": float(cfg.model.get("dropout", 0.0)), "head_hidden": cfg.model.get("head_hidden")}


def labelled_data(spec: str, vectoriser=None, val_size: int | float | None = None) -> TrainingData:
    """The training split of ``spec`` (less a validation tail, as ``train`` carves it), preprocessed as the
    encoder's training data was: documents go through the encoder's own ``vectoriser`` (not a new one fitted
    here, whose vocabulary would not match the encoder's inputs)."""
    full = load_eval_data(spec, vectoriser, default_split="train", sparse=True)
    if full.split == "test":
        raise InputError(f"{spec}: the test split is for `raeflow eval`, not for fine-tuning")
    if full.y is None:
        raise InputError(f"{spec} has no labels, and fine-tuning a classifier needs them (a folder of images "
                         "needs one subfolder per class; .jsonl/Parquet rows a 'label' field)")
    n = len(full)
    k = validation_size(n, val_size)
    train_part = full.subset(slice(0, n - k), "train")
    val = full.subset(slice(n - k, n), "val") if k else None
    return TrainingData(train_part, val, vectoriser)


def finetune(model: str | os.PathLike, dataset: str, output: str | os.PathLike | None = None, *,
             epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
             workers: int | None = None, head_hidden: int | None = None, dropout: float = 0.0, local: bool = False,
             sets: Sequence[str] = (), base: RunConfig | None = None, on_epoch: Callable | None = None,
             log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune the encoder of the autoencoder in ``model`` (a run or model directory) as a classifier of
    ``dataset``'s labels; writes the run directory ``output`` and returns :func:`train`'s result.

    ``base``: the run config to start from (``raeflow tune --finetune``'s, its train section the fine-tuning's);
    default the defaults. ``sets`` are ``section.key=value`` overrides of it (``train.weight_decay=1e-4``,
    ``train.stage_epochs.finetune=30``, ``data.val_size=5000``...); the explicit arguments win over them.
    ``on_epoch``: called with each epoch's result, as :func:`train` does.
    """
    art = TrainedModel.load(model)
    src = art.path
    info = get_variant(art.variant)
    if info.kind != "autoencoder" or cap.ENCODE not in art.capabilities:
        raise InputError(f"{src} holds a {art.variant!r} ({info.kind}), not an autoencoder to fine-tune")
    vectoriser = art.vectoriser

    cfg = (copy.deepcopy(base) if base is not None else RunConfig()).override(list(sets))
    cfg.data.dataset = dataset
    for section, key, value in (("train", "epochs", epochs), ("train", "lr", lr),
                                ("train", "batch_size", batch_size), ("ray", "workers", workers)):
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if vectoriser is not None:  # run.yaml records the vectoriser the data went through
        cfg.data.vocab_size, cfg.data.weighting = vectoriser.vocab_size, vectoriser.weighting
    cfg.output = str(output) if output else str(Path("runs") / f"{art.variant}-finetune-"
                                                                f"{time.strftime('%Y%m%d-%H%M%S')}")

    # A tracked encoder run: the fine-tuning run logs to the same trackers, as a child of its MLflow run.
    parent = None
    if (src.parent / "run.yaml").is_file():
        src_tracking = RunConfig.from_yaml(src.parent / "run.yaml").tracking
        if src_tracking.backends and not cfg.tracking.backends:
            from raeflow.tracking import default_mlflow_uri

            # The encoder run's own store (its parent run lives there), wherever this run's directory goes.
            cfg.tracking.backends = list(src_tracking.backends)
            cfg.tracking.uri = src_tracking.uri or default_mlflow_uri(src.parent)
            cfg.tracking.experiment = src_tracking.experiment
        parent = src_tracking.mlflow_run_id
    data = labelled_data(dataset, vectoriser, cfg.data.val_size)
    classes = data.train.classes
    num_classes = len(classes) if classes else int(data.train.y.max()) + 1
    # The head's initial weights follow train.seed, as a model train() builds does: without this they came from
    # wherever the global RNG stood, and two fine-tunings of one encoder with the same seed differed (issue 17's
    # seed-0 repeats measured 1.34 and 1.46% where the tune trials had measured 1.43 and 1.30%).
    seed_everything(cfg.train.seed)
    clf = Classifier.from_autoencoder(art.model, num_classes, head_hidden, input_shape=data.train.shape,
                                      pretrained={"path": str(src), "variant": art.variant,
                                                  "sha256": art.sha256}, dropout=dropout)
    log(f"fine-tuning the {art.variant} encoder of {src} as a {num_classes}-class classifier "
        f"({clf.feature_dim} features{f', head {head_hidden}' if head_hidden else ''})")
    return train(cfg, local=local, log=log, model=clf, data=data, parent_run_id=parent, on_epoch=on_epoch)
