# (temporary) GPU timing of the eager step, fused vs unfused
import sys, time; sys.path.insert(0, '.')
import numpy as np, cupy as cp, lvae, layers, kernels
for fused in (False, True):
    kernels.set_fusion(fused)
    net = lvae.build_model('lvae').to('cuda'); opt = layers.Adam(net.parameters(), lr=2e-3); noise = lvae.Noise(0)
    x = cp.asarray((np.random.default_rng(0).random((256,784)) < 0.3).astype(np.float32))
    def run():
        noise.new_step(); obj, t = lvae.elbo(net, x, noise); opt.zero_grad(); (-obj).backward(); opt.step(); return t
    for _ in range(5): run()
    cp.cuda.Device().synchronize(); t0 = time.perf_counter()
    for _ in range(50): t = run()
    cp.cuda.Device().synchronize(); dt = (time.perf_counter()-t0)/50
    print(f'fused={fused}: {dt*1000:.2f} ms/step elbo {float(t["elbo"]):.2f}')
