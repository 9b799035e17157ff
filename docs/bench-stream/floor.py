"""The memory floor under `raeflow bench stream`'s streamed side: Ray Train v2 + Ray Data on the same corpus, the
same one worker and the same read pipeline, but a training function that only iterates its shard (no model, no
optimiser, no metrics relay). What this process tree peaks at is what Ray's own processes cost before raeflow
trains anything; the streamed side's peak minus this is raeflow's share.

    python docs/bench-stream/floor.py /work/runs/bench-stream/corpus-200000
"""
import sys
import time
from pathlib import Path

from raeflow import raycluster
from raeflow.bench.embed import MiB, MemorySampler
from raeflow.data.stream import open_streamed


def iterate_only(config):
    import ray.train

    rows = 0
    for b in ray.train.get_dataset_shard("train").iter_batches(batch_size=512, batch_format="numpy"):
        rows += len(b["x"])
    Path(config["out"]).write_text(str(rows))  # result.metrics keeps only rows reported with a checkpoint


def main(corpus: str) -> None:
    raycluster.ensure_ray(num_cpus=2)
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = open_streamed(corpus, log=print)
    out = f"/tmp/raeflow-floor-{time.time_ns()}.rows"
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        trainer = TorchTrainer(
            iterate_only, train_loop_config={"out": out}, datasets={"train": data.datasets(shuffle_seed=0)["train"]},
            dataset_config=ray.train.DataConfig(datasets_to_split=[]),
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"floor-{int(time.time())}", storage_path="/tmp/raeflow-floor"))
        trainer.fit()
        wall = time.perf_counter() - t0
    print(f"rows {int(Path(out).read_text()):,} in {wall:.0f} s; peak PSS {mem.peak_pss / MiB:,.0f} MiB")
    for k, v in mem.peak_by.items():
        print(f"{v:8,d}  {k}")


if __name__ == "__main__":
    main(sys.argv[1])
