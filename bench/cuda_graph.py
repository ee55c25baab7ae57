"""An experiment: the whole training step recorded once as a CUDA graph, then replayed.

Why: at batch 256 the GPU step is bound by launching ~1000 small kernels from Python, not
by arithmetic (bench/README.md: 19.4 ms on an H100 for 2.6 GFLOP). A CUDA graph records
every kernel of one step and launches them all with one call.

A replay runs the recorded kernels with the recorded arguments on the recorded memory, so
everything that changes from step to step must live in device memory at a fixed address:

- the batch: copied into a fixed input buffer (``GraphStep.x``) before each launch;
- the noise eps: drawn *outside* the graph into a fixed buffer (``BufferNoise``); random
  numbers drawn inside it would come out the same at every replay;
- the warm-up weight beta and Adam's bias-corrected step size and eps: 0-d device arrays
  (``GraphStep.scalars``) written before each launch; a Python number given to a kernel
  is fixed into the graph when it is recorded;
- the step's temporaries: they come from a private memory pool, so that memory the graph
  uses as scratch is never handed to another array between replays;
- nothing inside the step may read a value back to the host.

On NumPy (no graph) ``GraphStep.step`` runs the same step body directly: the tests check
on the CPU that it equals train.py's step, and on a GPU that replays equal eager steps.

Status: written on a machine without a GPU (2026-11-25); bench.py's B2 times it beside
the eager step and PyTorch when run with --device cuda. Not used by train.py.
"""
import gc
import math

import numpy as np

import lvae
from autograd import Tensor, cupy, get_array_module

WARMUP_STEPS = 2  # eager steps before recording: CuPy compiles its kernels, the pool fills


class BufferNoise:
    """eps ~ N(0, I) for a recorded step: ``normal(shape)`` hands out consecutive views of
    one flat buffer, in the order the step asks for them (``rewind()`` at the start of
    each step); ``refill()`` draws the next step's values into the same memory."""

    def __init__(self, size, like, seed=0):
        xp = get_array_module(like)
        self.flat = xp.empty(size, like.dtype)
        self.rng = np.random.default_rng(seed)
        self.gpu_rng = None if xp is np else lvae.gpu_generator()  # as lvae.Noise
        self.offset = 0

    def refill(self):
        """The next step's draws; on a GPU from CuPy's generator reseeded from the host
        one, as lvae.Noise does at every step (so both steps do the same work)."""
        if self.gpu_rng is None:
            self.flat[...] = self.rng.standard_normal(self.flat.shape, dtype=self.flat.dtype)
            return
        self.gpu_rng.seed(int(self.rng.integers(2 ** 62)))
        self.flat[...] = self.gpu_rng.standard_normal(self.flat.shape, dtype=self.flat.dtype)

    def rewind(self):
        self.offset = 0

    def new_step(self):  # lvae.Noise's interface; the draws happen in refill()
        pass

    def normal(self, shape, like=None):
        n = math.prod(shape)
        if self.offset + n > self.flat.size:
            raise ValueError(f"BufferNoise: the step asks for more than the {self.flat.size} "
                             f"numbers the buffer holds (is it the shape it was made for?)")
        out = self.flat[self.offset:self.offset + n].reshape(shape)
        self.offset += n
        return out


class GraphStep:
    """One ELBO training step of ``net`` with ``optimizer`` (a layers.Adam) on batches of
    ``batch_size`` rows, recorded as a CUDA graph after ``WARMUP_STEPS`` eager steps.

    step(batch, beta) trains on one batch. ``sums`` accumulates, on the device, the batch
    means of (elbo, log_px, KL of each layer) over the steps: read it when you need it
    (a read waits for the GPU). On NumPy every step runs eagerly.
    """

    def __init__(self, net, optimizer, batch_size, seed=0, record=True):
        like = net.output.weight.data
        self.xp = xp = get_array_module(like)
        if any(getattr(m, "momentum", 0.1) is None for m in net.modules()):
            # the exact average's weight 1/batches_seen changes at every step
            raise ValueError("GraphStep: batch norms with momentum=None cannot be recorded")
        self.net, self.optimizer = net, optimizer
        self.x = xp.zeros((batch_size, net.x_dim), like.dtype)
        self.noise = BufferNoise(batch_size * sum(net.z_dims), like, seed)
        self.scalars = xp.zeros(3, like.dtype)  # beta, Adam's step_size and eps_hat
        self.sums = xp.zeros(2 + net.n_layers, like.dtype)
        self.steps_done, self.graph = 0, None
        self.record = record and xp is not np
        if self.record:
            # A blocking stream: CuPy's default (legacy) stream waits for it and it for
            # the default stream, so work outside step() (initialisation, evaluation, a
            # test reading the weights) stays ordered with the replays without events.
            # The catch: nothing may be put on the default stream while it records
            # (cudaErrorStreamCaptureImplicit); body() runs entirely inside `with
            # self.stream`, and CuPy points cuBLAS and cuRAND at the current stream.
            self.stream = cupy.cuda.Stream()
            self.pool = cupy.cuda.MemoryPool()

    def body(self):
        """The step as the GPU runs it: every input is read from the fixed buffers."""
        self.noise.rewind()
        self.optimizer.zero_grad()
        beta = Tensor(self.scalars[0])
        objective, terms = lvae.elbo(self.net, self.x, self.noise, beta)
        (-objective).backward()
        self.optimizer.update(self.scalars[1], self.scalars[2])
        # one small add per term: xp.stack of more than 8 arrays would copy a table of
        # pointers from host memory, which a recording must not contain
        for i, term in enumerate([terms["elbo"], terms["log_px"], *terms["kl"]]):
            self.sums[i:i + 1] += term

    def prepare(self, batch, beta):
        """Host side, before each step: the batch, fresh noise, beta, Adam's scalars."""
        if batch.shape != self.x.shape:
            raise ValueError(f"GraphStep: batches must have shape {self.x.shape} (a recorded "
                             f"step has fixed shapes), got {batch.shape}")
        self.x[...] = self.xp.asarray(batch)  # CuPy cannot assign a NumPy array into its own
        self.noise.refill()
        self.optimizer.t += 1
        step_size, eps_hat = self.optimizer.step_scalars()
        self.scalars[...] = self.xp.asarray([beta, step_size, eps_hat], self.scalars.dtype)

    def step(self, batch, beta=1.0):
        if not self.record:
            self.prepare(batch, beta)
            self.body()
            return
        with self.stream:
            self.prepare(batch, beta)  # on the graph's stream: ordered before the launch
            with cupy.cuda.using_allocator(self.pool.malloc):
                if self.graph is None and self.steps_done >= WARMUP_STEPS:
                    # no frees of old arrays inside the recording: collect the garbage
                    # now, and keep the collector from running (and freeing) until it ends
                    gc.collect()
                    collector_was_on = gc.isenabled()
                    gc.disable()
                    try:
                        self.graph = self._record()
                    finally:
                        if collector_was_on:
                            gc.enable()
                if self.graph is None:
                    self.body()
                else:
                    self.graph.launch(self.stream)
        self.steps_done += 1

    def _record(self):
        """The body recorded as a CUDA graph on ``self.stream``, not run.

        CuPy records in relaxed mode (``begin_capture``'s default), in which a pool that
        grows (cudaMalloc) during the recording is allowed. cuBLAS (CUDA 12.2 and later)
        takes its workspace with stream-ordered cudaMallocAsync, which the recording
        captures like any other work, so no workspace has to be set beforehand (why
        PyTorch stopped setting one from CUDA 12.2, pytorch#113994). Both read from
        documentation and source, not yet tried on a GPU."""
        self.stream.begin_capture()
        try:
            self.body()
        except BaseException:
            try:  # leave the stream usable; the body's error is the one to see
                self.stream.end_capture()
            except Exception:
                pass
            raise
        return self.stream.end_capture()

    def synchronize(self):
        if self.record:
            self.stream.synchronize()
