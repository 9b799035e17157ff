"""Where a --workers 2 step goes on this 2-core host, without Ray: `raeflow bench train`'s own model and loss
(`ae` 784-1000-500-250-30, BCE, Adam 1e-3), 256 rows per rank, one torch thread per rank, gloo over loopback. Times
per step: forward+backward alone (no DDP), the all-reduce of the gradients alone (11.3 MB), and a DDP step, each
averaged over 30 steps after 5 warm-up steps; and the plain loop's step of 512 rows on two threads.

    python docs/bench-train/allreduce.py
"""
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from raeflow.bench.train import HIDDEN, LATENT
from raeflow.registry import build_model


def model():
    return build_model("ae", input_shape=[1, 28, 28], latent_dim=LATENT, hidden=HIDDEN)  # as bench train's _model


def run(rank, world, q):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    m = model(); opt = torch.optim.Adam(m.parameters(), 1e-3)
    x = torch.rand(256, 1, 28, 28)
    def step():
        opt.zero_grad(); loss = m(x)["loss"]; loss.backward(); opt.step()
    def timed(f, n=30, warm=5):
        for _ in range(warm): f()
        dist.barrier(); t = time.perf_counter(); c = time.process_time()
        for _ in range(n): f()
        return (time.perf_counter() - t) / n * 1000, (time.process_time() - c) / n * 1000
    res = {"compute": timed(step)}
    grads = [p.grad for p in m.parameters()]
    flat = torch.cat([g.flatten() for g in grads])
    res["allreduce %.1f MB" % (flat.numel() * 4 / 1e6)] = timed(lambda: dist.all_reduce(flat))
    ddp = nn.parallel.DistributedDataParallel(m)
    opt2 = torch.optim.Adam(ddp.parameters(), 1e-3)
    def dstep():
        opt2.zero_grad(); loss = ddp(x)["loss"]; loss.backward(); opt2.step()
    res["ddp step"] = timed(dstep)
    if rank == 0: q.put(res)
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.set_num_threads(2)
    m = model(); opt = torch.optim.Adam(m.parameters(), 1e-3); x = torch.rand(512, 1, 28, 28)
    def step():
        opt.zero_grad(); loss = m(x)["loss"]; loss.backward(); opt.step()
    for _ in range(5): step()
    t = time.perf_counter(); c = time.process_time()
    for _ in range(30): step()
    print(f"plain, 512 rows, 2 threads: {(time.perf_counter()-t)/30*1000:.1f} ms/step wall, {(time.process_time()-c)/30*1000:.1f} ms CPU")
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    ps = [ctx.Process(target=run, args=(r, 2, q)) for r in range(2)]
    [p.start() for p in ps]; res = q.get(); [p.join() for p in ps]
    for k, (w, c) in res.items():
        print(f"rank 0, 256 rows, 1 thread, {k}: {w:.1f} ms wall, {c:.1f} ms CPU")
    os.system("uptime")
