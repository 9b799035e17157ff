"""Where a --workers 2 step goes on this 2-core host: the same 784-1000-500-250-30 AE, 256 rows per rank, one
torch thread per rank, gloo over loopback. Times per step: forward+backward alone (no DDP), the all-reduce of the
gradients alone (11.3 MB), and a DDP step (overlapped), each averaged over 30 steps after 5 warm-up steps."""
import os, sys, time
import torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.nn as nn

def model():
    dims = [784, 1000, 500, 250, 30]
    enc = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]
    r = dims[::-1]
    dec = [m for a, b in zip(r, r[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]
    return nn.Sequential(*enc, *dec, nn.Sigmoid())

def run(rank, world, q):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    m = model(); opt = torch.optim.Adam(m.parameters(), 1e-3)
    x = torch.rand(256, 784)
    def step():
        opt.zero_grad(); loss = nn.functional.binary_cross_entropy(m(x), x, reduction="sum"); loss.backward(); opt.step()
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
        opt2.zero_grad(); loss = nn.functional.binary_cross_entropy(ddp(x), x, reduction="sum"); loss.backward(); opt2.step()
    res["ddp step"] = timed(dstep)
    if rank == 0: q.put(res)
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.set_num_threads(2)
    m = model(); opt = torch.optim.Adam(m.parameters(), 1e-3); x = torch.rand(512, 784)
    def step():
        opt.zero_grad(); loss = nn.functional.binary_cross_entropy(m(x), x, reduction="sum"); loss.backward(); opt.step()
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
