"""Smoke-run every recipe in ``configs/``: one epoch per stage on a few thousand rows, then ``raeflow eval`` of it
with every task that applies (cut to small sizes). Nothing is lost by a refactor when this passes.

    .venv/bin/python tests/smoke_recipes.py [--rows 3000] [--only NAME ...] [--out runs/smoke]

Not collected by pytest (it takes minutes: ~1 min per recipe on two cores); run it before resolving an issue
that touches training, eval, serve or embed. Exits non-zero when any recipe fails, naming it.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subset(data, rows: int):
    """The first ``rows`` training rows and the first ``rows // 6`` validation rows of a loaded dataset."""
    from raeflow.data import TrainingData

    val = None if data.val is None else data.val.subset(slice(0, max(1, rows // 6)))
    return TrainingData(data.train.subset(slice(0, rows)), val, data.vectoriser)


def smoke(recipe: Path, rows: int, out: Path) -> dict:
    import torch

    from raeflow.config import RunConfig
    from raeflow.evaluate import evaluate
    from raeflow.models.base import TrainPlan
    from raeflow.registry import build_model
    from raeflow.train.run import in_memory_data, model_config, train

    torch.set_num_threads(1)  # a smoke run, not a benchmark: leave a core to whatever else runs
    cfg = RunConfig.from_yaml(recipe)
    cfg.train.epochs = 1
    cfg.output = str(out / recipe.stem)
    data = subset(in_memory_data(cfg), rows)
    stages = build_model(cfg.variant, **model_config(cfg, data)).stages(TrainPlan(1))
    cfg.train.stage_epochs = {s.name: 1 for s in stages}
    t0 = time.perf_counter()
    result = train(cfg, local=True, data=data, log=lambda s: None)
    opts = {"k": 5, "likelihood_n": 300, "parzen_samples": 500, "denoise_n": 300, "probe_train": 2000}
    res = evaluate(result.run_dir, opts=opts, log=lambda s: None)
    return {"recipe": recipe.name, "variant": cfg.variant, "tasks": sorted(res["tasks"]),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--only", nargs="*", default=None, help="recipe stems to run (default: all)")
    ap.add_argument("--out", default=str(ROOT / "runs" / f"smoke-{time.strftime('%Y%m%d-%H%M%S')}"))
    args = ap.parse_args()
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    if args.only:
        recipes = [r for r in recipes if r.stem in args.only]
    failed = []
    for r in recipes:
        try:
            row = smoke(r, args.rows, Path(args.out))
            print(f"ok    {row['recipe']:<28} {row['variant']:<12} {row['seconds']:>6}s  eval: {', '.join(row['tasks'])}",
                  flush=True)
        except Exception:  # noqa: BLE001 - report every recipe, then fail
            failed.append(r.name)
            print(f"FAIL  {r.name}\n{traceback.format_exc()}", flush=True)
    print(f"{len(recipes) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
