#!/usr/bin/env python3
"""Speed and memory benchmark of the Ladder VAE engine (CPU and GPU), with PyTorch as the
baseline on the same architecture (bench/torch_lvae.py).

    python bench/bench.py                       # --device cpu (the default)
    python bench/bench.py --device all --out bench/results/$(date +%F)-h100.txt
    python bench/bench.py --device cuda --quick # a smoke run: fewer steps and images

Sections (bench/README.md explains every figure):

  CPU (--device cpu or all)
    A1 training step, paper's 5-layer LVAE and VAE, batch 256, float32: ours vs PyTorch
       (torch.set_num_threads(--threads)) in a worker process, interleaved in rounds;
       forward / backward / optimiser split; estimated epoch seconds
    A2 matrix-product bound: FLOPs of every matmul of a step / measured sgemm rate, and
       the step's own GEMMs timed alone
    A3 engine overhead per recorded op (1-element arrays)
    A4 L_5000 evaluation throughput and its memory against K (tracemalloc)
    A5 peak memory (VmHWM) of train.py run in a child process (real MNIST loader)
    A6 projection of the paper's 2000-epoch recipe, and the targets of issue A
  GPU (--device cuda or all)
    B1 fused vs unfused merge and KL kernels: time, achieved bandwidth vs a device-to-
       device copy and vs the nominal peak
    B2 training step: numpy / cupy-unfused / cupy-fused / PyTorch (CUDA if available)
    B3 L_5000 evaluation on the GPU, extrapolated to the full test set; targets of issue B

Numbers on a shared machine are noisy: the ratios measured in the same run (ours vs
PyTorch, interleaved) are what to compare between runs.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import cli  # noqa: E402  (argparse only: NumPy must wait for the thread settings below)


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer steps and images (a smoke run)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--threads", type=cli.count(1), default=2,
                   help="CPU threads for PyTorch (torch.set_num_threads) and, unless "
                        "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS/MKL_NUM_THREADS are already "
                        "set, for NumPy's BLAS (default 2: the 2-core target machine)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the PyTorch process
    args = p.parse_args(argv)
    # checked now, not when it is used: the report is written after minutes of work
    problem = args.out is not None and _unwritable(args.out)
    if problem:
        p.error(f"argument --out: {problem}")
    return args


def _unwritable(path):
    """Why the report could not be written to ``path``, or None. Report.write makes the
    missing folders, so the nearest folder that exists must be one we can write in."""
    if not path:  # abspath("") would be the current folder
        return "an empty file name (an unset variable, as in --out=$OUT?)"
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return f"{path} is a folder; give a file name"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"no permission to write {path}"
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK):
        return f"no permission to write in {folder}"
    return None


ARGS = parse_args(sys.argv[1:])
# BLAS threads must be fixed before NumPy is imported. Remember what the user had set.
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_USER_THREAD_ENV = {k: os.environ[k] for k in _THREAD_VARS if k in os.environ}
if not _USER_THREAD_ENV:
    for _k in _THREAD_VARS:
        os.environ[_k] = str(ARGS.threads)

import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

import autograd  # noqa: E402
import data  # noqa: E402
import gaussian  # noqa: E402
import kernels  # noqa: E402
import lvae  # noqa: E402
from layers import Adam, Dense  # noqa: E402

# PyTorch runs in a separate worker process (class TorchWorker), never in this one: our
# engine builds its graph out of Python objects, and importing torch adds ~150k objects
# that every full garbage collection then walks, which slows our steps by milliseconds and
# our per-op overhead several-fold. This process looks like train.py (NumPy, the engine,
# the data); the two processes take turns, so they never compete for the CPU.
import importlib.util  # noqa: E402
HAVE_TORCH = importlib.util.find_spec("torch") is not None
TORCH_ERROR = None if HAVE_TORCH else "skipped: PyTorch not installed (pip install torch==2.13.0)"

cupy = autograd.cupy if autograd.cuda_available() else None
pc = time.perf_counter

BATCH = 256
LR = 2e-3
MNIST_TRAIN, MNIST_TEST = 60000, 10000
STEPS_PER_EPOCH = math.ceil(MNIST_TRAIN / BATCH)


# ----------------------------------------------------------------------------- report
class Report:
    def __init__(self):
        self.lines = []

    def __call__(self, text=""):
        print(text, flush=True)
        self.lines.append(text)

    def section(self, title):
        self("")
        self(title)
        self("-" * len(title))

    def write(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")


rep = Report()


def ms(seconds):
    return f"{seconds * 1e3:.1f} ms"


def verdict(ok):
    return "MET" if ok else "NOT MET"


def mib(nbytes):
    return nbytes / 2 ** 20


def cpu_sync():
    pass


def cuda_sync_cupy():
    cupy.cuda.Device().synchronize()


# ----------------------------------------------------------------------------- machine
def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=20).stdout.strip()
    except Exception:
        return ""


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        return float("nan")


def blas_info():
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{cfg.get('name')} {cfg.get('version')} ({cfg.get('openblas configuration', '')})".strip()
    except Exception:
        return "unknown"


def machine_info():
    rep.section("Machine")
    rep(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; command: python {' '.join(sys.argv)}")
    head = _run(["git", "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "status", "--porcelain", "--", "autograd.py", "layers.py", "gaussian.py",
                  "kernels.py", "lvae.py"]).replace("\n", ", ")
    rep(f"repository: commit {head or '?'}; uncommitted engine changes: {dirty or 'none'}")
    rep(f"CPU: {cpu_model()}; {os.cpu_count()} logical CPUs, "
        f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} usable; "
        f"memory {mem_total_gib():.1f} GiB")
    la = os.getloadavg()
    rep(f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} "
        f"(a load above the core count means other work shares the CPU: numbers are noisy)")
    rep(f"python {platform.python_version()}; numpy {np.__version__}; BLAS: {blas_info()}")
    env = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_", "GOTO"))}
    origin = ("set by the user" if _USER_THREAD_ENV else f"set by this script to --threads={ARGS.threads}")
    rep(f"BLAS/OpenMP environment ({origin}): "
        + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "none"))
    if "OPENBLAS_CORETYPE" in os.environ:
        rep(f"NOTE: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} forces OpenBLAS's kernel "
            f"choice; unset it to let OpenBLAS detect the CPU")
    try:
        import threadpoolctl
        pools = threadpoolctl.threadpool_info()
        rep("threadpools: " + "; ".join(f"{p.get('internal_api')} {p.get('version')} "
                                       f"{p.get('architecture', '')} threads={p.get('num_threads')}"
                                       for p in pools))
    except Exception:
        pass
    w = torch_worker()
    if w is not None:
        i = w.info
        rep(f"torch {i['version']} (in a worker process): {i['threads']} threads "
            f"(set_num_threads({ARGS.threads})), MKL {i['mkl']}, oneDNN {i['mkldnn']}, CUDA {i['cuda']}"
            + (f" ({i['gpu']}; TF32 matmul {i['tf32']}, i.e. full float32)" if i["cuda"] else ""))
    else:
        rep(f"torch: {TORCH_ERROR}")
    if cupy is not None:
        rt = cupy.cuda.runtime
        props = rt.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        rep(f"GPU: {name}, {props['totalGlobalMem'] / 2 ** 30:.1f} GiB, "
            f"{props['multiProcessorCount']} SMs, compute capability {props['major']}.{props['minor']}; "
            f"cupy {cupy.__version__}, CUDA runtime {rt.runtimeGetVersion()}, driver "
            f"{rt.driverGetVersion()}; CUPY_TF32={os.environ.get('CUPY_TF32', '0 (default)')}")
    else:
        rep(f"GPU: none usable: {autograd.cuda_problem()}")


# ----------------------------------------------------------------------------- data
_DATA = {}


def dataset():
    if "ds" not in _DATA:
        t0 = pc()
        _DATA["ds"] = data.load_dataset("mnist")
        _DATA["test"] = data.binarized_test_set(_DATA["ds"].test_x)
        _DATA["load_s"] = pc() - t0
    return _DATA["ds"]


def train_batches(n=8, seed=0):
    """n dynamically binarised MNIST batches of 256 (as the training loop sees them)."""
    ds = dataset()
    rng = np.random.default_rng(seed)
    it = data.iterate_minibatches(ds.train_x, BATCH, rng)
    return [next(it) for _ in range(n)]


def epoch_data_seconds():
    """Time of the data pipeline alone for one epoch (shuffle + binarise every batch)."""
    ds = dataset()
    t0 = pc()
    for _ in data.iterate_minibatches(ds.train_x, BATCH, np.random.default_rng(1)):
        pass
    return pc() - t0


# ----------------------------------------------------------------------------- steppers
class Stepper:
    """Runs training steps; run(n) -> [(t_forward, t_backward, t_optimiser)] with a
    synchronisation at the end of each phase; throughput(n) -> seconds per step with
    one synchronisation before and after the n steps."""

    def __init__(self, step, sync):
        self.step, self.sync, self.i = step, sync, 0

    def run(self, n, split=True):
        out = []
        for _ in range(n):
            out.append(self.step(self.i, split))
            self.i += 1
        self.sync()
        return out

    def throughput(self, n):
        self.sync()
        t0 = pc()
        self.run(n, split=False)
        return (pc() - t0) / n


def ours_stepper(kind, device, batches, fused=True):
    """Our engine: noise + ELBO / zero_grad + backward / Adam, as train.py's loop."""
    net = lvae.build_model(kind, seed=0)
    if device == "cuda":
        net.to("cuda")
    opt = Adam(net.parameters(), lr=LR)
    noise = lvae.Noise(1)
    xs = [autograd.to_device(b, device) for b in batches]
    sync = cuda_sync_cupy if device == "cuda" else cpu_sync

    def step(i, split=True):
        kernels.set_fusion(fused)  # a global switch, and steppers take turns
        x = xs[i % len(xs)]
        t0 = pc()
        noise.new_step()
        objective, _ = lvae.elbo(net, x, noise, beta=1.0)
        if split:
            sync()
        t1 = pc()
        opt.zero_grad()
        (-objective).backward()
        if split:
            sync()
        t2 = pc()
        opt.step()
        if split:
            sync()
        t3 = pc()
        return t1 - t0, t2 - t1, t3 - t2
    stepper = Stepper(step, sync)
    stepper.model = net
    return stepper


def graph_stepper(kind, batches):
    """The experiment of bench/cuda_graph.py: train.py's step with fused kernels, recorded
    once as a CUDA graph and replayed (its phases cannot be timed apart: all in 'fwd')."""
    from cuda_graph import GraphStep
    net = lvae.build_model(kind, seed=0).to("cuda")
    graph_step = GraphStep(net, Adam(net.parameters(), lr=LR), BATCH, seed=1)
    xs = [autograd.to_device(b, "cuda") for b in batches]
    cuda_sync_cupy()  # the batches are on the device before any timing starts

    def step(i, split=True):
        kernels.set_fusion(True)  # what the recording holds; the eager warm-up steps use it
        t0 = pc()
        graph_step.step(xs[i % len(xs)], 1.0)
        if split:
            cuda_sync_cupy()
        return pc() - t0, 0.0, 0.0
    stepper = Stepper(step, cuda_sync_cupy)
    stepper.graph_step = graph_step
    return stepper


def torch_stepper(kind, device, batches):
    """The same step in eager PyTorch (runs inside the worker process)."""
    import torch
    import torch_lvae
    model = torch_lvae.build_model(kind).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=LR, eps=1e-8)
    xs = [torch.from_numpy(b).to(device) for b in batches]
    sync = torch.cuda.synchronize if device == "cuda" else cpu_sync

    def step(i, split=True):
        x = xs[i % len(xs)]
        t0 = pc()
        objective = torch_lvae.elbo(model, x, beta=1.0)
        if split:
            sync()
        t1 = pc()
        opt.zero_grad(set_to_none=True)
        (-objective).backward()
        if split:
            sync()
        t2 = pc()
        opt.step()
        if split:
            sync()
        t3 = pc()
        return t1 - t0, t2 - t1, t3 - t2
    return Stepper(step, sync)


# ----------------------------------------------------------------------------- the PyTorch worker
class TorchWorker:
    """A child process that owns PyTorch; JSON lines over its stdin/stdout."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                      f"--threads={ARGS.threads}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=REPO, bufsize=1)
        self.info = self.call("info")

    def call(self, cmd, **kw):
        self.proc.stdin.write(json.dumps(dict(cmd=cmd, **kw)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch worker exited (code {self.proc.poll()})")
        out = json.loads(line)
        if isinstance(out, dict) and "error" in out:
            raise RuntimeError(f"PyTorch worker, {cmd}: {out['error']}")
        return out

    def stepper(self, name, kind, device):
        self.call("make", name=name, kind=kind, device=device)
        worker = self

        class Remote:
            def run(self, n, split=True):
                return [tuple(r) for r in worker.call("run", name=name, n=n, split=split)]

            def throughput(self, n):
                return worker.call("throughput", name=name, n=n)

            def sync(self):
                pass

            def drop(self):
                worker.call("drop", name=name)
        return Remote()

    def close(self):
        try:
            self.call("quit")
        except Exception:
            pass
        self.proc.wait(timeout=30)


def worker_main():
    """The worker's loop (python bench/bench.py --worker): one JSON command per line."""
    import traceback
    protocol, sys.stdout = sys.stdout, sys.stderr  # stray prints must not break the protocol
    import torch
    import torch_lvae
    torch.set_num_threads(ARGS.threads)
    torch.manual_seed(0)
    steppers = {}

    def handle(msg):
        cmd = msg["cmd"]
        if cmd == "info":
            cuda = torch.cuda.is_available()
            return dict(version=torch.__version__, threads=torch.get_num_threads(),
                        mkl=torch.backends.mkl.is_available(),
                        mkldnn=torch.backends.mkldnn.is_available(), cuda=cuda,
                        gpu=torch.cuda.get_device_name(0) if cuda else None,
                        tf32=torch.backends.cuda.matmul.allow_tf32,
                        cudnn_tf32=torch.backends.cudnn.allow_tf32)
        if cmd == "equivalence":
            return {kind: dict(params=torch_lvae.n_parameters(torch_lvae.build_model(kind)),
                               diff=torch_lvae.check_equivalence(kind))
                    for kind in ("lvae", "vae")}
        if cmd == "make":
            steppers[msg["name"]] = torch_stepper(msg["kind"], msg["device"], train_batches())
            return True
        if cmd == "run":
            return steppers[msg["name"]].run(msg["n"], msg["split"])
        if cmd == "throughput":
            return steppers[msg["name"]].throughput(msg["n"])
        if cmd == "drop":
            steppers.pop(msg["name"], None)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return True
        if cmd == "overhead":
            n, times = msg["n"], []
            for _ in range(msg["repeats"]):
                x = torch.ones(1, requires_grad=True)
                y = torch.ones(1, requires_grad=True)
                t0 = pc()
                z = x
                for _ in range(n):
                    z = z + y
                z.backward()
                times.append((pc() - t0) / n)
                del z
            return statistics.median(times)
        raise ValueError(f"unknown command {cmd!r}")

    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            protocol.write("true\n")
            protocol.flush()
            return 0
        try:
            out = handle(msg)
        except Exception:
            out = {"error": traceback.format_exc()}
        protocol.write(json.dumps(out) + "\n")
        protocol.flush()
    return 0


_WORKER = {}


def torch_worker():
    """The PyTorch worker, started on first use; None when PyTorch is not installed."""
    global TORCH_ERROR
    if not HAVE_TORCH or TORCH_ERROR:
        return None
    if "w" not in _WORKER:
        try:
            _WORKER["w"] = TorchWorker()
        except Exception as e:
            TORCH_ERROR = f"skipped: the PyTorch worker did not start ({e})"
            return None
    return _WORKER["w"]


def measure_split(steppers, warmup, rounds, per_round):
    """Interleave the steppers in rounds (A's steps, B's steps, A's, ...) so that a
    burst of load from other processes hits all of them; per-phase medians."""
    for s in steppers.values():
        s.run(warmup)
    times = {name: [] for name in steppers}
    by_round = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, s in steppers.items():
            rows = s.run(per_round)
            times[name].extend(rows)
            by_round[name].append(statistics.median(sum(r) for r in rows))
    out = {}
    for name, rows in times.items():
        tot = [sum(r) for r in rows]
        out[name] = dict(fwd=statistics.median(r[0] for r in rows),
                         bwd=statistics.median(r[1] for r in rows),
                         opt=statistics.median(r[2] for r in rows),
                         step=statistics.median(tot), mean=statistics.fmean(tot),
                         min=min(tot), n=len(tot), rounds=by_round[name])
    return out


def recorded_ops(model, batch):
    """Number of nodes with a backward in one training step's graph (None if the engine's
    graph can no longer be walked through ``_parents``/``_backward``)."""
    try:
        noise = lvae.Noise(5)
        noise.new_step()
        objective, _ = lvae.elbo(model, batch, noise, beta=1.0)
        seen, stack, count = set(), [objective], 0
        while stack:
            t = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            if getattr(t, "_backward", None) is not None:
                count += 1
            stack.extend(p for p in getattr(t, "_parents", ()) if getattr(p, "requires_grad", False))
        return count
    except Exception:
        return None


def paired_ratio(a, b):
    """Median over rounds of (a's median in the round / b's median in the same round):
    the two ran back to back, so a burst of outside load mostly hits both."""
    return statistics.median(x / y for x, y in zip(a["rounds"], b["rounds"]))


def noise_note(*results):
    """A warning when step times spread: the mean far above the fastest step."""
    spread = max(r["mean"] / r["min"] for r in results)
    if spread > 1.25:
        return (f"    NOISY: mean step up to {spread:.1f}x the fastest (other work on the machine); "
                f"trust the paired and fastest-step ratios more than the medians")
    return None


def measure_throughput(steppers, rounds, per_round):
    """Seconds per step with no synchronisation inside a step (on a GPU the host runs
    ahead of the device, as in training); median over interleaved rounds."""
    times = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, s in steppers.items():
            times[name].append(s.throughput(per_round))
    return {name: statistics.median(v) for name, v in times.items()}


def split_table(results, ref=None):
    rep(f"  {'':22s} {'step':>10s} {'forward':>10s} {'backward':>10s} {'optimiser':>10s}"
        f" {'min':>9s}  steps" + ("   vs ref" if ref else ""))
    for name, r in results.items():
        ratio = f"   {r['step'] / results[ref]['step']:.2f}x" if ref and ref in results else ""
        rep(f"  {name:22s} {ms(r['step']):>10s} {ms(r['fwd']):>10s} {ms(r['bwd']):>10s} "
            f"{ms(r['opt']):>10s} {ms(r['min']):>9s}  {r['n']:5d}{ratio}")


# ----------------------------------------------------------------------------- A0 equivalence
def equivalence():
    rep.section("Architecture check: ours vs bench/torch_lvae.py")
    w = torch_worker()
    theirs = None
    if w is not None:
        try:
            theirs = w.call("equivalence")
        except RuntimeError as e:  # e.g. our layer names changed: report it, go on
            rep(f"  the check failed (bench/torch_lvae.py may need updating): {e}")
    for kind in ("lvae", "vae"):
        ours = sum(p.size for p in lvae.build_model(kind).parameters())
        if theirs is None:
            rep(f"  {kind}: ours {ours:,} parameters" + (f"; torch {TORCH_ERROR}" if TORCH_ERROR else ""))
            continue
        t = theirs[kind]
        same = "same" if ours == t["params"] else "DIFFERENT"
        rep(f"  {kind}: parameters ours {ours:,}, torch {t['params']:,}: {same}"
            + ("  (the paper's LVAE: 1,859,424)" if kind == "lvae" else ""))
        rep("    same weights and noise, float64, largest relative difference: "
            + ", ".join(f"{k} {v:.1e}" for k, v in t["diff"].items()))


# ----------------------------------------------------------------------------- A1 CPU steps
def cpu_steps(res):
    rep.section(f"A1. CPU training step: paper's 5-layer models, batch {BATCH}, float32")
    warmup = 2 if ARGS.quick else 3
    rounds, per_round = (2, 5) if ARGS.quick else (8, 8)
    rep(f"  {warmup} warm-up steps each, then {rounds} interleaved rounds of {per_round} steps "
        f"(ours, torch, ours, torch, ...; PyTorch in its own process); medians; real MNIST "
        f"batches; forward = noise + ELBO, backward = zero_grad + backward, optimiser = Adam "
        f"step (lr {LR})")
    batches = train_batches()
    data_s = epoch_data_seconds()
    res["data_epoch_s"] = data_s
    w = torch_worker()
    for kind in ("lvae", "vae"):
        steppers = {f"ours {kind}": ours_stepper(kind, "cpu", batches)}
        tname = f"torch {kind} ({ARGS.threads} thr)"
        if w is not None:
            steppers[tname] = w.stepper(tname, kind, "cpu")
        r = measure_split(steppers, warmup, rounds, per_round)
        if w is not None:
            steppers[tname].drop()
        rep(f"  {kind.upper()}:")
        split_table(r, ref=tname if w is not None else None)
        ours = r[f"ours {kind}"]
        res[kind] = ours
        if w is not None:
            res[f"torch_{kind}"] = r[tname]
        # a step under tracemalloc: NumPy's buffers + Python objects allocated in one step
        step = steppers[f"ours {kind}"]
        tracemalloc.start()
        tracemalloc.reset_peak()
        step.run(1)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        res[f"{kind}_step_peak"] = peak
        epoch = STEPS_PER_EPOCH * ours["step"] + data_s
        res[f"{kind}_epoch_s"] = epoch
        line = (f"    epoch (estimated: {STEPS_PER_EPOCH} x median step + data pipeline "
                f"{data_s:.2f} s): ours {epoch:.1f} s (with the mean step, spikes included: "
                f"{STEPS_PER_EPOCH * ours['mean'] + data_s:.1f} s)")
        if w is not None:
            t = res[f"torch_{kind}"]
            line += f"; torch {STEPS_PER_EPOCH * t['step'] + data_s:.1f} s"
            res[f"{kind}_ratio"] = dict(median=ours["step"] / t["step"], min=ours["min"] / t["min"],
                                        paired=paired_ratio(ours, t))
            rep(f"    ours / torch: {ours['step'] / t['step']:.2f}x (medians), "
                f"{res[f'{kind}_ratio']['paired']:.2f}x (paired by round), "
                f"{ours['min'] / t['min']:.2f}x (fastest steps)")
            note = noise_note(ours, t)
            if note:
                rep(note)
        rep(line)
        rep(f"    memory allocated during one step (tracemalloc peak; NumPy registers its "
            f"buffers with tracemalloc): {mib(peak):.0f} MiB")
        n_ops = recorded_ops(step.model, batches[0])
        if n_ops:
            res[f"{kind}_ops"] = n_ops
            rep(f"    recorded ops in one step's graph: {n_ops}")
    if w is None:
        rep(f"  PyTorch comparison {TORCH_ERROR}")


# ----------------------------------------------------------------------------- A2 matmul bound
def dense_layers(model):
    return [m for m in model.modules() if isinstance(m, Dense)]


def step_flops(model, batch=BATCH):
    """FLOPs of every matrix product of one training step. Forward 2 m n k per dense layer;
    backward dW = x^T g (2 m n k) and dx = g W^T (2 m n k) except for the first layer,
    whose input (the data) needs no gradient."""
    first = model.up_blocks[0].dense[0]
    total = 0
    for d in dense_layers(model):
        n_in, n_out = d.weight.shape
        f = 2 * batch * n_in * n_out
        total += f * (2 if d is first else 3)
    return total


def _time_call(fn, min_time=0.05, repeats=5):
    """Fastest over `repeats` of the mean time of fn() in a loop of ~min_time/4 seconds
    (the minimum: outside load only ever adds time)."""
    fn()
    n, t = 1, 0.0
    while True:
        t0 = pc()
        for _ in range(n):
            fn()
        t = pc() - t0
        if t >= min_time / 4 or n >= 1 << 16:
            break
        n *= 2
    n = max(1, int(n * (min_time / 4) / max(t, 1e-9)))
    samples = []
    for _ in range(repeats):
        t0 = pc()
        for _ in range(n):
            fn()
        samples.append((pc() - t0) / n)
    return min(samples)


REPRESENTATIVE_GEMMS = [  # (label, m, k, n, transpose a, transpose b): the big layers of a step
    ("x W      256x784 @ 784x512", 256, 784, 512, False, False),
    ("x^T g    784x256 @ 256x512", 784, 256, 512, True, False),
    ("g W^T    256x512 @ 512x784", 256, 512, 784, False, True),
    ("h W      256x512 @ 512x512", 256, 512, 512, False, False),
]


def sgemm_rate():
    """GFLOP/s of float32 matmul on the representative shapes (total flops / total time)."""
    rng = np.random.default_rng(0)
    rows, flops, secs = [], 0, 0.0
    for label, m, k, n, ta, tb in REPRESENTATIVE_GEMMS:
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        a_, b_ = (a.T if ta else a), (b.T if tb else b)
        t = _time_call(lambda: a_ @ b_)
        rows.append((label, 2 * m * k * n / t / 1e9))
        flops += 2 * m * k * n
        secs += t
    return flops / secs / 1e9, rows


def step_gemm_seconds(model, batch=BATCH):
    """Every GEMM of one step timed alone, in the layouts layers.linear uses."""
    rng = np.random.default_rng(0)
    first = model.up_blocks[0].dense[0]
    total = 0.0
    for d in dense_layers(model):
        n_in, n_out = d.weight.shape
        x = rng.standard_normal((batch, n_in), dtype=np.float32)
        w = rng.standard_normal((n_in, n_out), dtype=np.float32)
        g = rng.standard_normal((batch, n_out), dtype=np.float32)
        total += _time_call(lambda: x @ w, 0.01, 3)
        total += _time_call(lambda: x.T @ g, 0.01, 3)
        if d is not first:
            total += _time_call(lambda: g @ w.T, 0.01, 3)
    return total


def _sgemm_in_child(threads):
    """GFLOP/s of 256x784x512 in a fresh process with `threads` BLAS threads."""
    code = ("import numpy as np, time\n"
            "a = np.random.rand(256, 784).astype(np.float32)\n"
            "b = np.random.rand(784, 512).astype(np.float32)\n"
            "[a @ b for _ in range(5)]\n"
            "t = time.perf_counter()\n"
            "[a @ b for _ in range(60)]\n"
            "print(2 * 256 * 784 * 512 * 60 / (time.perf_counter() - t) / 1e9)\n")
    env = dict(os.environ, **{k: str(threads) for k in _THREAD_VARS})
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=60).stdout
        return float(out.strip())
    except Exception:
        return None


def matmul_bound(res):
    rep.section("A2. Matrix-product bound (float32)")
    rate, rows = sgemm_rate()
    res["sgemm_gflops"] = rate
    for label, r in rows:
        rep(f"  sgemm {label}: {r:7.1f} GFLOP/s")
    rep(f"  sgemm rate (all representative shapes together): {rate:.1f} GFLOP/s")
    fresh = {t: _sgemm_in_child(t) for t in sorted({ARGS.threads, 1})}
    if all(v is not None for v in fresh.values()):
        rep("  256x784x512 in a fresh process: " + ", ".join(
            f"{v:.1f} GFLOP/s with {t} BLAS thread{'s' * (t > 1)}" for t, v in fresh.items())
            + (" (more threads no faster than fewer: the cores are shared with other work)"
               if fresh.get(ARGS.threads, 0) <= fresh.get(1, 0) and ARGS.threads > 1 else ""))
    for kind in ("lvae", "vae"):
        model = lvae.build_model(kind)
        flops = step_flops(model)
        fwd = sum(2 * BATCH * d.weight.shape[0] * d.weight.shape[1] for d in dense_layers(model))
        bound = flops / (rate * 1e9)
        gemms = step_gemm_seconds(model)
        res[f"{kind}_bound"], res[f"{kind}_gemms"] = bound, gemms
        line = (f"  {kind.upper()}: {len(dense_layers(model))} dense layers; matmul FLOPs per step "
                f"{flops / 1e9:.2f} G (forward {fwd / 1e9:.2f} G); bound = FLOPs / rate = {ms(bound)}; "
                f"the step's own {len(dense_layers(model)) * 3 - 1} GEMMs timed alone: {ms(gemms)}")
        rep(line)
        if kind in res:
            step = res[kind]["step"]
            rep(f"    our step {ms(step)} = {step / bound:.2f}x the bound, {step / gemms:.2f}x the "
                f"GEMMs alone (non-matmul work + engine: {ms(max(step - gemms, 0))})")
            if f"torch_{kind}" in res:
                t = res[f"torch_{kind}"]["step"]
                rep(f"    torch step {ms(t)} = {t / bound:.2f}x the bound")


# ----------------------------------------------------------------------------- A3 overhead
def engine_overhead(res):
    rep.section("A3. Engine overhead per recorded op (1-element float32 arrays)")
    from autograd import Tensor, no_grad
    n, repeats = 10000, (3 if ARGS.quick else 7)
    one = lambda: np.ones(1, np.float32)
    fwd, bwd, nograd, raw = [], [], [], []
    for _ in range(repeats):
        x, y = Tensor(one(), requires_grad=True), Tensor(one(), requires_grad=True)
        t0 = pc()
        z = x
        for _ in range(n):
            z = z + y
        t1 = pc()
        z.backward()
        t2 = pc()
        fwd.append((t1 - t0) / n)
        bwd.append((t2 - t1) / n)
        del z
        with no_grad():
            t0 = pc()
            z = x
            for _ in range(n):
                z = z + y
            nograd.append((pc() - t0) / n)
        # the raw NumPy work of the same: n adds forward, n gradient accumulations backward
        a, b, g = one(), one(), one()
        t0 = pc()
        c = a
        for _ in range(n):
            c = c + b
        acc = g
        for _ in range(n - 1):
            acc = acc + g
        raw.append((pc() - t0) / n)
    f, b_, ng, r = (statistics.median(v) * 1e6 for v in (fwd, bwd, nograd, raw))
    overhead = f + b_ - r
    best = min(a + b for a, b in zip(fwd, bwd)) * 1e6 - min(raw) * 1e6
    res["overhead_us"] = overhead
    rep(f"  chain z = z + y, {n} ops, median of {repeats}: forward (recording) {f:.2f} us/op, "
        f"backward {b_:.2f} us/op, forward under no_grad {ng:.2f} us/op")
    rep(f"  raw NumPy for the same work (2 adds per op): {r:.2f} us/op")
    rep(f"  engine overhead = forward + backward - raw = {overhead:.2f} us per recorded op "
        f"(best of {repeats}: {best:.2f} us)")
    for kind in ("lvae", "vae"):
        if f"{kind}_ops" in res and kind in res:
            total = res[f"{kind}_ops"] * overhead * 1e-6
            rep(f"  {kind.upper()}: {res[f'{kind}_ops']} recorded ops per step x {overhead:.2f} us = "
                f"{ms(total)} of the {ms(res[kind]['step'])} step")
    w = torch_worker()
    if w is not None:
        t = w.call("overhead", n=n, repeats=repeats)
        rep(f"  for reference, PyTorch eager, same chain, forward + backward: {t * 1e6:.2f} us/op")


# ----------------------------------------------------------------------------- A4 evaluation
def eval_throughput(res):
    rep.section("A4. L_5000 evaluation (lvae.log_likelihood_bound, LVAE, CPU)")
    dataset()
    test = _DATA["test"]
    net = lvae.build_model("lvae", seed=0)
    lvae.log_likelihood_bound(net, test[:1], samples=50)  # warm-up
    n = 4 if ARGS.quick else 20
    t0 = pc()
    lvae.log_likelihood_bound(net, test[:n], samples=5000)
    t = pc() - t0
    rows_per_s = n * 5000 / t
    res["eval_rows_per_s"] = rows_per_s
    res["eval_images_per_s"] = n / t
    rep(f"  {n} test images, K = 5000, default batch_size 100 / max_rows {lvae.MAX_ROWS['cpu']}: {t:.1f} s -> "
        f"{n / t:.2f} images/s ({rows_per_s:,.0f} samples/s); full test set ({MNIST_TEST} images) "
        f"~ {MNIST_TEST / (n / t) / 60:.0f} min")
    # memory against K: with max_rows = 2000 and 2 images a chunk holds at most 1000
    # samples, so K = 1000 and K = 5000 run at the same chunk size: the peak must not grow
    peaks = {}
    for k in (250, 1000, 5000):
        tracemalloc.start()
        tracemalloc.reset_peak()
        lvae.log_likelihood_bound(net, test[:2], samples=k, max_rows=2000)
        peaks[k] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    res["eval_peak_ratio"] = peaks[5000] / peaks[1000]
    rep("  memory against K (tracemalloc peak; 2 images, max_rows=2000 so chunks cap at 1000 "
        "samples): " + ", ".join(f"K={k}: {mib(v):.1f} MiB" for k, v in peaks.items())
        + f"; K=5000 / K=1000 = {res['eval_peak_ratio']:.2f} (1.0 = independent of K once the "
          f"chunk is at its cap; the default cap is {lvae.MAX_ROWS['cpu']} rows: see A5 for its RSS)")


# ----------------------------------------------------------------------------- A5 peak memory
TRAIN_RUN_ARGS = ["--epochs=1", "--warmup=1", "--eval_interval=1", "--eval_lk_samples=1000",
                  "--eval_lk_images=20", "--final_lk_samples=5000", "--final_lk_images=4",
                  "--log_interval=0"]
# the child runs train.py unchanged and reports the peak resident set of its own address
# space at exit (VmHWM). Not ru_maxrss: on Linux a process keeps the peak of what it was
# before execve, so a child forked from this (large) process would report our peak.
_TRAIN_CHILD = """
import atexit, re, runpy, sys
def _peak():
    with open('/proc/self/status') as f:
        print('BENCH_VMHWM_KB', re.search(r'VmHWM:\\s+(\\d+)', f.read()).group(1), flush=True)
atexit.register(_peak)
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


def peak_memory(res):
    rep.section("A5. Peak memory of a training run (train.py in a child process)")
    import re
    import shutil
    import tempfile
    out_dir = tempfile.mkdtemp(prefix="lvae_bench_")
    cmd = [sys.executable, "-c", _TRAIN_CHILD] + TRAIN_RUN_ARGS + [f"--out_dir={out_dir}"]
    t0 = pc()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    found = re.search(r"BENCH_VMHWM_KB (\d+)", proc.stdout)
    if proc.returncode != 0 or not found:
        rep(f"  train.py failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
        return
    peak = int(found.group(1)) / 1024
    res["peak_rss_mib"] = peak
    epoch = re.search(r"epoch 1:.*?([\d.]+)s( \||$)", proc.stdout, re.M)
    rep(f"  python train.py {' '.join(TRAIN_RUN_ARGS)}: the whole recipe at full size (real "
        f"MNIST loader, one epoch of LVAE-5 at batch {BATCH}, test ELBO, L_1000 and L_5000 at "
        f"their default chunk cap, batch-norm recomputation over the training set, plots, "
        f"checkpoint), fewer epochs and test images; {pc() - t0:.0f} s")
    rep(f"  peak resident set (VmHWM of the child at exit): {peak:.0f} MiB = {peak * 2 ** 20 / 1e9:.2f} GB")
    if epoch:
        res["measured_epoch_s"] = float(epoch.group(1))
        rep(f"  its epoch, timed by train.py itself (every step, data pipeline, per-step terms): "
            f"{res['measured_epoch_s']:.1f} s")
    rep("  (the peak does not grow with the number of epochs or test images: every step and "
        "every evaluation chunk has the same shapes)")


# ----------------------------------------------------------------------------- A6 projection + targets
def cpu_summary(res):
    rep.section("A6. Projection of the paper's recipe and the targets of issue A")
    if "lvae_epoch_s" in res and "eval_rows_per_s" in res:
        import train  # its module-level values are the recipe's defaults
        r = res["eval_rows_per_s"]
        train_h = train.epochs * res["lvae_epoch_s"] / 3600
        # every eval_interval epochs: test ELBO (10000 rows) + L_K on eval_lk_images images;
        # at the end: batch-norm statistics over the training set, then L_5000 on the test set
        n_evals = train.epochs // train.eval_interval if train.eval_interval else 1
        k, images = train.eval_lk_samples, train.eval_lk_images or MNIST_TEST
        periodic_h = n_evals * (MNIST_TEST + images * k) / r / 3600
        final_h = (MNIST_TRAIN + train.final_lk_samples * MNIST_TEST) / r / 3600
        res["recipe_h"] = train_h + periodic_h + final_h
        rep(f"  {train.epochs} epochs of LVAE-5 at {res['lvae_epoch_s']:.1f} s/epoch: {train_h:.1f} h; "
            f"{n_evals} periodic evaluations (test ELBO + L_{k} on {images} images, train.py "
            f"defaults) at {r:,.0f} samples/s: {periodic_h:.1f} h; final L_{train.final_lk_samples} "
            f"on {MNIST_TEST} images: {final_h:.1f} h; total {res['recipe_h']:.1f} h")
        if "lvae_gemms" in res:
            # the floor of any implementation that runs these GEMMs with this BLAS
            floor_h = train.epochs * (STEPS_PER_EPOCH * res["lvae_gemms"]
                                      + res.get("data_epoch_s", 0.0)) / 3600
            rep(f"  floor: with no work but the step's own GEMMs (A2: {ms(res['lvae_gemms'])}) "
                f"and the data pipeline, {train.epochs} epochs take {floor_h:.1f} h; with the "
                f"evaluations above, {floor_h + periodic_h + final_h:.1f} h")
    rep("  targets (reported, not asserted):")
    if "lvae_ratio" in res:
        r = res["lvae_ratio"]
        rep(f"    LVAE-5 step <= 0.8x PyTorch ({ARGS.threads} threads): {r['median']:.2f}x (medians; "
            f"paired {r['paired']:.2f}x, fastest steps {r['min']:.2f}x)  {verdict(r['median'] <= 0.8)}")
    else:
        rep(f"    LVAE-5 step <= 0.8x PyTorch: {TORCH_ERROR}")
    if "lvae_bound" in res and "lvae" in res:
        ratio = res["lvae"]["step"] / res["lvae_bound"]
        rep(f"    LVAE-5 step <= 1.5x matrix-product bound: {ratio:.2f}x (fastest step "
            f"{res['lvae']['min'] / res['lvae_bound']:.2f}x)  {verdict(ratio <= 1.5)}")
    if "overhead_us" in res:
        rep(f"    engine overhead <= 10 us per recorded op: {res['overhead_us']:.2f} us  "
            f"{verdict(res['overhead_us'] <= 10)}")
    if "peak_rss_mib" in res:
        gb = res["peak_rss_mib"] * 2 ** 20 / 1e9
        rep(f"    peak memory of a full MNIST training run <= 1.5 GB: {gb:.2f} GB  {verdict(gb <= 1.5)}")
    if "eval_peak_ratio" in res:
        rep(f"    L_5000 evaluation memory bounded (peak K=5000 / K=1000 at the chunk cap): "
            f"{res['eval_peak_ratio']:.2f}  {verdict(res['eval_peak_ratio'] <= 1.1)}")
    if "recipe_h" in res:
        rep(f"    2000-epoch recipe < 3 h on this machine: {res['recipe_h']:.1f} h  "
            f"{verdict(res['recipe_h'] < 3)}")


# ----------------------------------------------------------------------------- B1 GPU kernels
SPIN_SRC = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


class GpuTimer:
    """CUDA-event timing of a function called back to back.

    python_time: events around `calls` back-to-back calls from Python (what a user sees,
    launch overhead included). gpu_time: the same calls queued behind a spinning kernel, so
    that the host has enqueued them all before the GPU reaches the first: the GPU then runs
    them without gaps and the events measure kernel time alone."""

    def __init__(self):
        self.spin = cupy.RawKernel(SPIN_SRC, "spin")
        self.start, self.end = cupy.cuda.Event(), cupy.cuda.Event()
        self.spin((1,), (1,), (np.int64(1000),))
        cuda_sync_cupy()
        cycles = 10 ** 7
        self.start.record()
        self.spin((1,), (1,), (np.int64(cycles),))
        self.end.record()
        self.end.synchronize()
        self.cycles_per_s = cycles / (cupy.cuda.get_elapsed_time(self.start, self.end) / 1e3)

    def _events(self, fn, args_sets, calls, spin_s=0.0):
        if spin_s:
            self.spin((1,), (1,), (np.int64(spin_s * self.cycles_per_s),))
        self.start.record()
        for i in range(calls):
            fn(*args_sets[i % len(args_sets)])
        self.end.record()
        self.end.synchronize()
        return cupy.cuda.get_elapsed_time(self.start, self.end) / 1e3 / calls

    def time(self, fn, args_sets, calls, repeats=5):
        fn(*args_sets[0])
        cuda_sync_cupy()
        py, gpu = [], []
        for _ in range(repeats):
            t0 = pc()
            py.append(self._events(fn, args_sets, calls))
            host = pc() - t0
            gpu.append(self._events(fn, args_sets, calls, spin_s=1.5 * host + 2e-3))
        return statistics.median(py), statistics.median(gpu)


def copy_bandwidth(timer):
    """Device-to-device cudaMemcpy of 512 MiB, bytes read + written per second."""
    nbytes = 512 * 2 ** 20
    a = cupy.ones(nbytes // 4, np.float32)
    b = cupy.empty_like(a)
    rt = cupy.cuda.runtime
    stream = cupy.cuda.get_current_stream().ptr

    def memcpy():
        rt.memcpyAsync(b.data.ptr, a.data.ptr, nbytes, getattr(rt, "memcpyDeviceToDevice", 3), stream)

    def elementwise():
        cupy.copyto(b, a)
    _, t_copy = timer.time(memcpy, [()], 10)
    _, t_elem = timer.time(elementwise, [()], 10)
    return 2 * nbytes / t_copy, 2 * nbytes / t_elem


def nominal_bandwidth():
    """2 x memory clock x bus width (DDR), from the device attributes; a table as fallback."""
    rt = cupy.cuda.runtime
    dev = cupy.cuda.Device().id
    try:
        clock_khz = rt.deviceGetAttribute(36, dev)  # cudaDevAttrMemoryClockRate
        bus_bits = rt.deviceGetAttribute(37, dev)   # cudaDevAttrGlobalMemoryBusWidth
        if clock_khz > 0 and bus_bits > 0:
            return 2 * clock_khz * 1e3 * bus_bits / 8, f"{clock_khz / 1e3:.0f} MHz x {bus_bits} bit x 2"
    except Exception:
        pass
    name = rt.getDeviceProperties(dev)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    table = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
             "A100": 1.555e12, "L4": 0.3e12, "A10": 0.6e12, "V100": 0.9e12, "T4": 0.32e12}
    for key, bw in table.items():
        if key in name:
            return bw, f"datasheet value for {key}"
    return float("nan"), "unknown"


def l2_bytes():
    try:
        return cupy.cuda.runtime.deviceGetAttribute(38, cupy.cuda.Device().id)  # cudaDevAttrL2CacheSize
    except Exception:
        return 64 * 2 ** 20


KERNEL_SIZES = (1 << 16, 1 << 20, 1 << 24)  # elements: 64K, 1M, 16M
KERNEL_CASES = [  # (op, direction, inputs, outputs)
    ("merge", "forward", 4, 2),
    ("merge", "backward", 6, 4),
    ("kl", "forward", 4, 1),
    ("kl", "backward", 5, 4),
]
# which inputs are variances (must be positive), per case
_VARIANCE_INPUTS = {("merge", "forward"): (1, 3), ("merge", "backward"): (3, 5),
                    ("kl", "forward"): (1, 3), ("kl", "backward"): (2, 4)}


def size_label(n):
    """64K, 1M, 16M."""
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def kernel_inputs(rng, op, direction, n_in, n, l2):
    """Input sets for one kernel case: enough of them that rotating over them spans twice
    the L2 cache, so every call reads its inputs from DRAM. Variances are positive."""
    n_sets = max(1, min(64, math.ceil(2 * l2 / (n_in * n * 4))))
    sets = []
    for _ in range(n_sets):
        arrays = []
        for j in range(n_in):
            if j in _VARIANCE_INPUTS[(op, direction)]:
                arrays.append(rng.uniform(0.1, 2.0, n, dtype=np.float32))
            else:
                arrays.append(rng.standard_normal(n, dtype=np.float32))
        sets.append(tuple(arrays))
    return sets


def same_size_copy_bandwidth(timer, rng, n, l2):
    """Bytes read + written per second by an elementwise copy of n float32 elements, inputs
    rotating over more than twice the L2 as in the kernel rows. At 1M elements a kernel
    moves ~10-40 MB, a few microseconds of traffic, so the GPU's fixed cost per kernel
    (ramp-up, tail) is a visible share: this row says how much of the gap to the 512 MiB
    copy any kernel of that size shares."""
    n_sets = max(1, min(1024, math.ceil(2 * l2 / (n * 4))))
    sources = [(rng.standard_normal(n, dtype=np.float32),) for _ in range(n_sets)]
    target = cupy.empty(n, np.float32)
    _, t = timer.time(lambda a: cupy.copyto(target, a), sources, max(50, n_sets))
    return 2 * 4 * n / t


SWEEP_BLOCK_SIZES = (128, 256, 512, 1024)  # CuPy's ElementwiseKernel default is 128 threads


def block_size_sweep(timer, rng, l2, copy_bw, n=1 << 20):
    """The fused kernels at n elements with other thread-block sizes (a diagnostic for the
    1M-element bandwidth target: does the launch shape matter?)."""
    rep(f"  block-size sweep at {size_label(n)} elements, fused gpu time (GB/s, %copy); kernels.py "
        f"launches with CuPy's default, {SWEEP_BLOCK_SIZES[0]}:")
    for op, direction, n_in, n_out in KERNEL_CASES:
        name = f"lvae_{op}_{'fwd' if direction == 'forward' else 'bwd'}"
        kernel = kernels._kernel(name)
        sets = kernel_inputs(rng, op, direction, n_in, n, l2)
        cells = []
        for block in SWEEP_BLOCK_SIZES:
            _, t = timer.time(lambda *a, b=block: kernel(*a, block_size=b), sets, 50)
            bw = (n_in + n_out) * 4 * n / t
            cells.append(f"{block}: {t * 1e6:5.1f}us ({bw / 1e9:,.0f}, {100 * bw / copy_bw:.0f}%)")
        rep(f"    {name:16s} " + "  ".join(cells))
        del sets
    cupy.get_default_memory_pool().free_all_blocks()


def gpu_kernels(res):
    rep.section("B1. Fused vs unfused Gaussian kernels (float32, CuPy)")
    timer = GpuTimer()
    copy_bw, elem_bw = copy_bandwidth(timer)
    nominal, how = nominal_bandwidth()
    res["copy_bw"], res["nominal_bw"] = copy_bw, nominal
    rep(f"  device-to-device cudaMemcpy, 512 MiB: {copy_bw / 1e9:,.0f} GB/s (read + write; the "
        f"practical peak); elementwise copy {elem_bw / 1e9:,.0f} GB/s; nominal peak "
        f"{nominal / 1e9:,.0f} GB/s ({how}); L2 {l2_bytes() / 2 ** 20:.0f} MiB")
    rep("  gpu: kernel time with the host's launch overhead hidden (calls queued behind a "
        "spinning kernel); py: back-to-back calls from Python (launch overhead included).")
    rep("  GB/s: the op's minimal traffic (each input read once, each output written once) / gpu "
        "time; inputs rotate over buffer sets larger than twice the L2, so they come from DRAM.")
    rep(f"  {'op':16s} {'elements':>9s} {'fused gpu':>10s} {'py':>8s} {'unfused gpu':>12s} {'py':>8s}"
        f" {'speedup':>8s} {'fused GB/s':>10s} {'%copy':>6s} {'%nominal':>8s} {'%copy@size':>11s}")
    sizes = KERNEL_SIZES
    rng = cupy.random.RandomState(0)
    l2 = l2_bytes()
    copy_at = {n: same_size_copy_bandwidth(timer, rng, n, l2) for n in sizes}
    rep("  %copy@size: against an elementwise copy of the same number of elements, timed the same "
        "way (" + ", ".join(f"{size_label(n)}: {bw / 1e9:,.0f} GB/s" for n, bw in copy_at.items())
        + "): what any one kernel of that size reaches, launch and tail included")
    res["kernels"] = []
    for op, direction, n_in, n_out in KERNEL_CASES:
        fused = getattr(kernels, f"{op}_{direction}")
        unfused = getattr(gaussian, f"{op}_{direction}")
        for n in sizes:
            sets = kernel_inputs(rng, op, direction, n_in, n, l2)
            cuda_sync_cupy()
            f_py, f_gpu = timer.time(fused, sets, 50)
            u_py, u_gpu = timer.time(unfused, sets, 20)
            nbytes = (n_in + n_out) * 4 * n
            bw = nbytes / f_gpu
            row = dict(op=f"{op} {direction}", n=n, fused=f_gpu, unfused=u_gpu, bw=bw,
                       speedup=u_gpu / f_gpu, copy_same_size=copy_at[n])
            res["kernels"].append(row)
            label = size_label(n)
            short = f"{op} {'fwd' if direction == 'forward' else 'bwd'}"
            rep(f"  {short:16s} {label:>9s} {f_gpu * 1e6:8.1f}us {f_py * 1e6:6.1f}us "
                f"{u_gpu * 1e6:10.1f}us {u_py * 1e6:6.1f}us {u_gpu / f_gpu:7.1f}x {bw / 1e9:10,.0f} "
                f"{100 * bw / copy_bw:5.0f}% {100 * bw / nominal:7.0f}% {100 * bw / copy_at[n]:10.0f}%")
            del sets
    cupy.get_default_memory_pool().free_all_blocks()
    block_size_sweep(timer, rng, l2, copy_bw)


# ----------------------------------------------------------------------------- B2 GPU steps
def gpu_steps(res):
    rep.section(f"B2. Training step on the GPU: LVAE-5, batch {BATCH}, float32")
    batches = train_batches()
    warmup = 3 if ARGS.quick else 5
    rounds, per_round = (2, 5) if ARGS.quick else (4, 10)
    steppers = {"cupy unfused": ours_stepper("lvae", "cuda", batches, fused=False),
                "cupy fused": ours_stepper("lvae", "cuda", batches, fused=True)}
    try:  # an experiment never run on a GPU before: a failure is reported, B2 goes on
        graph = graph_stepper("lvae", batches)
        graph.run(4)  # warm-up, recording, and replays
        steppers["cupy fused, CUDA graph"] = graph
    except Exception as e:
        rep(f"  CUDA-graph step (bench/cuda_graph.py) FAILED, left out: {type(e).__name__}: {e}")
        kernels.set_fusion(True)
    torch_dev = None
    w = torch_worker()
    if w is not None:
        torch_dev = "cuda" if w.info["cuda"] else "cpu"
        steppers[f"torch eager {torch_dev}"] = w.stepper(f"torch eager {torch_dev}", "lvae", torch_dev)
    t0 = pc()
    split = measure_split(steppers, warmup, rounds, per_round)
    thr = measure_throughput(steppers, rounds, per_round)
    kernels.set_fusion(True)
    if w is not None:
        steppers[f"torch eager {torch_dev}"].drop()
    rep(f"  batches already on the device; {warmup} warm-up steps each (includes CuPy's kernel "
        f"compilation), then {rounds} interleaved rounds of {per_round} steps ({pc() - t0:.0f} s)")
    rep("  step = throughput: synchronise, run the steps, synchronise (host and GPU overlap, as in "
        "training); split = each phase timed with a synchronisation at its end (median)")
    if "lvae" in res:
        numpy_step = res["lvae"]["step"]
        rep(f"  numpy (CPU, from A1, {ARGS.threads} BLAS threads): {ms(numpy_step)}")
    else:
        r = measure_split({"numpy": ours_stepper("lvae", "cpu", batches)}, 2, 1, 5 if ARGS.quick else 10)
        numpy_step = r["numpy"]["step"]
        rep(f"  numpy (CPU, {ARGS.threads} BLAS threads, median of {r['numpy']['n']}): {ms(numpy_step)}")
    ref = f"torch eager {torch_dev}" if torch_dev else None
    rep(f"  {'':22s} {'step':>10s} {'split:fwd':>10s} {'bwd':>10s} {'opt':>10s} {'vs numpy':>9s}"
        + (f" {'vs torch':>9s}" if ref else ""))
    for name in steppers:
        s = split[name]
        phases = ([ms(s["fwd"]), ms(s["bwd"]), ms(s["opt"])] if "graph" not in name
                  else [ms(s["fwd"]) + "*", "-", "-"])
        line = (f"  {name:22s} {ms(thr[name]):>10s} {phases[0]:>10s} {phases[1]:>10s} "
                f"{phases[2]:>10s} {numpy_step / thr[name]:8.1f}x")
        if ref:
            line += f" {thr[name] / thr[ref]:8.2f}x"
        rep(line)
    if "cupy fused, CUDA graph" in steppers:
        rep("  * the recorded step runs as one launch: its phases cannot be timed apart "
            "(whole step, synchronised)")
    noise_per_step()
    res["gpu_steps"] = thr
    res["gpu_torch_dev"] = torch_dev
    if w is None:
        rep(f"  PyTorch {TORCH_ERROR}")
    res["gpu_model"] = steppers["cupy fused"].model


def noise_per_step():
    """What lvae.Noise costs a GPU step: a reseed from the host generator, then one draw
    per stochastic layer, with cuRAND's default generator (XORWOW) and with Philox."""
    from cupy.cuda import curand
    shapes = [(1, BATCH, d) for d in lvae.PAPER_Z_DIMS]
    host = np.random.default_rng(0)
    for name, method in (("XORWOW, cuRAND's default", curand.CURAND_RNG_PSEUDO_XORWOW),
                         ("Philox, what lvae.Noise uses", curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)):
        rng = cupy.random.RandomState(method=method)

        def step():
            rng.seed(int(host.integers(2 ** 62)))
            for shape in shapes:
                rng.standard_normal(shape, dtype=np.float32)
        step()
        cuda_sync_cupy()
        t0, n = pc(), 20 if ARGS.quick else 100
        for _ in range(n):
            step()
        cuda_sync_cupy()
        rep(f"  noise of one step ({name}): reseed + {len(shapes)} draws {ms((pc() - t0) / n)}")


# ----------------------------------------------------------------------------- B3 GPU evaluation
def gpu_eval(res):
    rep.section("B3. L_5000 evaluation on the GPU (LVAE-5, fused kernels)")
    dataset()
    test = _DATA["test"]
    net = res.get("gpu_model") or lvae.build_model("lvae", seed=0).to("cuda")
    kernels.set_fusion(True)
    lvae.log_likelihood_bound(net, test[:2], samples=500)  # warm-up (eval-mode kernels)
    cuda_sync_cupy()
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    n = 100 if ARGS.quick else 300
    t0 = pc()
    lvae.log_likelihood_bound(net, test[:n], samples=5000)
    cuda_sync_cupy()
    t = pc() - t0
    full_min = t / n * MNIST_TEST / 60
    res["gpu_eval_min"] = full_min
    rep(f"  {n} test images, K = 5000 (batch_size 100, max_rows {lvae.MAX_ROWS['cuda']}): {t:.1f} s -> {n / t:.1f} "
        f"images/s; full test set ({MNIST_TEST} images) ~ {full_min:.1f} min (extrapolated); "
        f"CuPy pool after it {mib(pool.total_bytes()):.0f} MiB (bounded by the {lvae.MAX_ROWS['cuda']}-row chunks)")


def gpu_summary(res):
    rep.section("Targets of issue B (reported, not asserted)")
    rows = [r for r in res.get("kernels", []) if r["n"] >= 1 << 20]
    if rows:
        worst_bw = min(rows, key=lambda r: r["bw"])
        worst_sp = min(rows, key=lambda r: r["speedup"])
        frac = worst_bw["bw"] / res["copy_bw"]
        rep(f"    fused merge/KL at >= 1M elements >= 80% of the copy bandwidth: worst "
            f"{100 * frac:.0f}% ({worst_bw['op']}, {worst_bw['n']:,}; "
            f"{100 * worst_bw['bw'] / res['nominal_bw']:.0f}% of nominal)  {verdict(frac >= 0.8)}")
        rep(f"      (context, not the target: that kernel reaches "
            f"{100 * worst_bw['bw'] / worst_bw['copy_same_size']:.0f}% of an elementwise copy of "
            f"the same size)")
        rep(f"    fused >= 2x faster than unfused CuPy at >= 1M elements: worst "
            f"{worst_sp['speedup']:.1f}x ({worst_sp['op']}, {worst_sp['n']:,})  "
            f"{verdict(worst_sp['speedup'] >= 2)}")
    thr = res.get("gpu_steps")
    if thr and res.get("gpu_torch_dev") == "cuda":
        ratio = thr["cupy fused"] / thr["torch eager cuda"]
        rep(f"    CuPy training step <= PyTorch eager CUDA step: {ratio:.2f}x  {verdict(ratio <= 1)}")
        if "cupy fused, CUDA graph" in thr:
            rep(f"      (the CUDA-graph experiment, not train.py's step: "
                f"{thr['cupy fused, CUDA graph'] / thr['torch eager cuda']:.2f}x)")
    elif thr:
        rep("    CuPy training step <= PyTorch eager CUDA step: skipped (no PyTorch with CUDA)")
    if "gpu_eval_min" in res:
        rep(f"    full-test-set L_5000 evaluation: {res['gpu_eval_min']:.1f} min")


# ----------------------------------------------------------------------------- main
def main():
    t_start = pc()
    res = {}
    if ARGS.worker:
        return worker_main()
    machine_info()
    equivalence()
    if ARGS.device in ("cpu", "all"):
        cpu_steps(res)
        matmul_bound(res)
        engine_overhead(res)
        eval_throughput(res)
        peak_memory(res)
        cpu_summary(res)
    missing_cuda = False
    if ARGS.device in ("cuda", "all"):
        if cupy is None:
            rep.section("GPU")
            rep(f"  skipped: no CUDA: {autograd.cuda_problem()}")
            missing_cuda = ARGS.device == "cuda"  # asked for by name: the run failed
        else:
            gpu_kernels(res)
            gpu_steps(res)
            gpu_eval(res)
            gpu_summary(res)
    if "w" in _WORKER:
        _WORKER["w"].close()
    la = os.getloadavg()
    rep("")
    rep(f"total {pc() - t_start:.0f} s; load average at the end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    if ARGS.out:
        rep.write(ARGS.out)
        print(f"wrote {ARGS.out}")
    if missing_cuda:
        print("error: --device cuda, but CUDA is not available here", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
