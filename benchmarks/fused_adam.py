"""torch.optim.Adam(fused=True) against the engine's single-tensor Adam (not a test).

The batched engine keeps every lane's parameters in one flat buffer and steps torch's Adam on
it (klppo_bench/harness/batched/optim.py). This times one Adam step on a buffer the size of 5
Hopper lanes (64-64 actor and critic, about 10,500 parameters a lane), one torch thread, and
checks whether the fused kernel gives the same bits after 3000 steps.

    python benchmarks/fused_adam.py
"""
import time, torch
torch.set_num_threads(1)
n = 5 * 10_500
res = {}
for fused in (False, True):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n)); p.grad = torch.zeros(n)
    opt = torch.optim.Adam([p], lr=3e-4, fused=fused, foreach=None if fused else False)
    g = torch.Generator().manual_seed(1)
    ts = []
    for i in range(3000):
        p.grad.copy_(torch.randn(n, generator=g))
        t = time.perf_counter(); opt.step(); ts.append(time.perf_counter() - t)
    ts.sort()
    res[fused] = p.detach().clone()
    print(f"fused={fused}: median step {ts[len(ts)//2]*1e6:.1f} us")
d = (res[True] - res[False]).abs().max().item()
print("max abs diff after 3000 steps:", d, "bit-identical:", torch.equal(res[True], res[False]))
