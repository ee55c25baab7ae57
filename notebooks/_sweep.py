# temporary exploration script (deleted before hand-off)
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np, data, lvae
from layers import Adam, recompute_batchnorm_statistics
name, kind, zd, hd, epochs, warmup, ntrain, lr = sys.argv[1], sys.argv[2], eval(sys.argv[3]), eval(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), float(sys.argv[8])
bn = len(sys.argv) < 10 or sys.argv[9] == '1'
ds = data.load_mnist()
train_x = ds.train_x[:ntrain]
test_x = data.binarized_test_set(ds.test_x)[:2000]
net = lvae.build_model(kind, z_dims=zd, hidden=hd, seed=0, batch_norm=bn)
opt = Adam(net.parameters(), lr=lr)
noise = lvae.Noise(1); rng = np.random.default_rng(2)
hist = []
t0 = time.time()
for ep in range(epochs):
    beta = 1.0 if warmup <= 0 else min(1.0, ep / warmup)
    kls = []; el = []
    for b in data.iterate_minibatches(train_x, 256, rng):
        noise.new_step(); obj, terms = lvae.elbo(net, b, noise, beta)
        opt.zero_grad(); (-obj).backward(); opt.step()
        kls.append([float(k) for k in terms["kl"]]); el.append(float(terms["elbo"]))
    hist.append(dict(epoch=ep + 1, beta=beta, elbo=np.mean(el), kl=list(np.mean(kls, 0))))
recompute_batchnorm_statistics(net, data.iterate_minibatches(train_x, 1000, rng), lambda b: lvae.elbo(net, b, noise))
act, counts = lvae.active_units(net, test_x, noise)
klu = lvae.kl_per_unit(net, test_x, noise)
net.eval()
with lvae.no_grad():
    _, terms = lvae.elbo(net, test_x, noise)
res = dict(name=name, kind=kind, secs=time.time() - t0, counts=counts, kl_layer=[float(k.sum()) for k in klu],
           test_elbo=float(terms["elbo"]), last=hist[-1], units=[np.round(np.sort(k)[::-1], 3).tolist() for k in klu], act=[np.round(np.sort(a)[::-1], 3).tolist() for a in act])
print(json.dumps(res), flush=True)
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), name + "_" + kind + ".json"), "w") as f:
    json.dump(dict(res, hist=hist), f)
