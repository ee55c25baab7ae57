"""bench/cuda_graph.py, the experimental training step recorded as a CUDA graph.

On the CPU its step body (fixed buffers, beta and Adam's scalars as 0-d arrays) is checked
against the step train.py takes; on a GPU, replays of the recorded graph are checked
against the same step run eagerly.
"""
import gc
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import lvae  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from cuda_graph import WARMUP_STEPS, BufferNoise, GraphStep  # noqa: E402
from layers import Adam  # noqa: E402
from test_device_mixing import fake_cupy  # noqa: E402,F401  (a fixture)
from test_lvae import gpu_stand_ins  # noqa: E402,F401  (a fixture)

SIZES = dict(x_dim=12, z_dims=(4, 3, 2), hidden=(10, 8, 6), n_dense=2)
BATCH = 16


def model_and_adam(kind, device="cpu"):
    net = lvae.build_model(kind, seed=5, **SIZES).to(device).astype(np.float64)
    return net, Adam(net.parameters(), lr=3e-3)


def batches(n, xp=np):
    rng = np.random.default_rng(9)
    return [xp.asarray((rng.random((BATCH, SIZES["x_dim"])) < 0.4).astype(np.float64))
            for _ in range(n)]


def state(net, optimizer):
    """Every number a step changes: weights, batch-norm averages, Adam's moments and t."""
    out = {f"net.{k}": v for k, v in net.state_dict().items()}
    out.update({f"adam.{k}": v for k, v in optimizer.state_dict().items()})
    return out


@pytest.mark.parametrize("kind", ["lvae", "vae"])
def test_step_body_equals_the_training_step(kind):
    """Three steps (warm-up beta 0.3, then 1) of GraphStep against train.py's own step
    (lvae.elbo, backward, Adam.step) from the same weights with the same noise."""
    xs, betas = batches(3), [0.3, 1.0, 1.0]
    net, adam = model_and_adam(kind)
    graph_step = GraphStep(net, adam, BATCH, seed=2)
    for x, beta in zip(xs, betas):
        graph_step.step(x, beta)

    ref_net, ref_adam = model_and_adam(kind)
    noise = BufferNoise(BATCH * sum(SIZES["z_dims"]), ref_net.output.weight.data, seed=2)
    sums = np.zeros(2 + len(SIZES["z_dims"]))
    for x, beta in zip(xs, betas):
        noise.refill()
        noise.rewind()
        objective, terms = lvae.elbo(ref_net, x, noise, beta)
        ref_adam.zero_grad()
        (-objective).backward()
        ref_adam.step()
        sums += [terms["elbo"], terms["log_px"], *terms["kl"]]

    got, expected = state(net, adam), state(ref_net, ref_adam)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-12, atol=1e-14,
                                   err_msg=name)
    np.testing.assert_allclose(graph_step.sums, sums, rtol=1e-12)
    assert not np.allclose(expected["net.output.weight"],
                           model_and_adam(kind)[0].state_dict()["output.weight"])


def test_buffer_noise_and_batch_shape_errors():
    noise = BufferNoise(10, np.zeros(1), seed=0)
    noise.refill()
    first = noise.normal((2, 3)).copy()
    assert noise.normal((4,)).shape == (4,)
    with pytest.raises(ValueError, match="more than the 10 numbers"):
        noise.normal((1,))
    noise.rewind()
    np.testing.assert_array_equal(noise.normal((2, 3)), first)  # same values until refill
    net, adam = model_and_adam("lvae")
    with pytest.raises(ValueError, match=r"batches must have shape \(16, 12\)"):
        GraphStep(net, adam, BATCH).step(batches(1)[0][:5])
    next(m for m in net.modules() if hasattr(m, "momentum")).momentum = None
    with pytest.raises(ValueError, match="momentum=None cannot be recorded"):
        GraphStep(net, adam, BATCH)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", ["lvae", "vae"])
def test_graph_replays_equal_eager_steps_on_gpu(kind):
    """Steps after the warm-up are graph replays: they must leave the same state as the
    same steps run eagerly (float64; the kernels and their order are the same)."""
    import cupy
    xs = batches(WARMUP_STEPS + 4, cupy)
    results = []
    for record in (True, False):
        net, adam = model_and_adam(kind, "cuda")
        graph_step = GraphStep(net, adam, BATCH, seed=2, record=record)
        for i, x in enumerate(xs):
            graph_step.step(x, 0.5 if i < 3 else 1.0)
        graph_step.synchronize()
        assert (graph_step.graph is not None) == record
        results.append((state(net, adam), cupy.asnumpy(graph_step.sums)))
    (replayed, replayed_sums), (eager, eager_sums) = results
    for name in eager:
        np.testing.assert_allclose(replayed[name], eager[name], rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    np.testing.assert_allclose(replayed_sums, eager_sums, rtol=1e-9)


def test_recording_sequence_with_a_stand_in_for_cupy(monkeypatch):
    """Without a GPU: the order of CuPy calls that GraphStep.step makes (two eager steps,
    then one recorded and launched, then launches only), with a stand-in that logs them.
    The stand-in cannot record, so during the 'recording' the body really runs: this
    checks the control flow and CuPy's API names, not the replays' numbers."""
    import contextlib
    import types

    import cuda_graph
    log = []

    class Stream:
        def __enter__(self):
            log.append("enter stream")

        def __exit__(self, *exc):
            log.append("exit stream")

        def begin_capture(self):
            log.append("begin_capture")

        def end_capture(self):
            log.append("end_capture")
            return types.SimpleNamespace(launch=lambda stream: log.append("launch"))

        def synchronize(self):
            log.append("synchronize")

    @contextlib.contextmanager
    def using_allocator(malloc):
        assert malloc == "private pool's malloc"
        log.append("private pool")
        yield

    cuda = types.SimpleNamespace(Stream=Stream, using_allocator=using_allocator,
                                 MemoryPool=lambda: types.SimpleNamespace(
                                     malloc="private pool's malloc"))
    monkeypatch.setattr(cuda_graph, "cupy", types.SimpleNamespace(cuda=cuda))
    net, adam = model_and_adam("lvae")
    graph_step = GraphStep(net, adam, BATCH)
    graph_step.record, graph_step.stream = True, Stream()  # as on a GPU
    graph_step.pool = cuda.MemoryPool()
    bodies = []
    real_body = graph_step.body
    graph_step.body = lambda: (bodies.append(gc.isenabled()), real_body())
    for x in batches(WARMUP_STEPS + 3):
        graph_step.step(x)
    graph_step.synchronize()
    steps, current = [], None  # the calls of each step, from entering the stream to leaving it
    for entry in log:
        if entry == "enter stream":
            current = []
        elif entry == "exit stream":
            steps.append(current)
            current = []  # what comes after the steps (synchronize)
        else:
            current.append(entry)
    assert len(steps) == WARMUP_STEPS + 3 and log[-1] == "synchronize"
    assert len(bodies) == WARMUP_STEPS + 1  # the warm-up steps and the recording
    # Python's garbage collector is off while recording (a free then could hand memory
    # the graph uses to another array), and on again after
    assert bodies == [True] * WARMUP_STEPS + [False] and gc.isenabled()
    assert steps[:WARMUP_STEPS] == [["private pool"]] * WARMUP_STEPS
    assert steps[WARMUP_STEPS] == ["private pool", "begin_capture", "end_capture", "launch"]
    assert steps[WARMUP_STEPS + 1:] == [["private pool", "launch"]] * 2
    assert adam.t == WARMUP_STEPS + 3  # Adam's step count still moves on the host

    # a body that fails while recording: the capture is ended, the collector is on again,
    # and the body's error is the one raised
    log.clear()
    failing = GraphStep(net, adam, BATCH)
    failing.record, failing.stream, failing.pool = True, Stream(), cuda.MemoryPool()
    failing.steps_done = WARMUP_STEPS  # record at the next step

    def broken_body():
        raise RuntimeError("body failed")
    failing.body = broken_body
    with pytest.raises(RuntimeError, match="body failed"):
        failing.step(batches(1)[0])
    assert log == ["enter stream", "private pool", "begin_capture", "end_capture",
                   "exit stream"]
    assert gc.isenabled() and failing.graph is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_buffer_noise_hands_out_consecutive_parts_of_each_fresh_draw(dtype):
    """Within a step, the requests get consecutive, non-overlapping parts of the buffer
    (each layer its own noise), in the dtype of ``like``; each refill() draws new
    numbers (the same noise at every step would make a replay a fixed-noise fit)."""
    noise = BufferNoise(10, np.zeros(1, dtype), seed=0)
    noise.refill()
    first, second = noise.normal((2, 3)), noise.normal((4,))
    assert first.dtype == second.dtype == dtype
    np.testing.assert_array_equal(np.concatenate([first.ravel(), second]), noise.flat)
    step_one = noise.flat.copy()
    noise.refill()
    noise.rewind()
    assert not np.array_equal(noise.normal((10,)), step_one), "refill() drew the same numbers"


def test_buffer_noise_on_the_gpu_path_reseeds_from_the_host_generator(gpu_stand_ins):
    """On a GPU, refill() draws from the device generator reseeded from the host one at
    every refill (stand-ins for CuPy and lvae.gpu_generator): fresh numbers at every
    step, the same for the same seed, different for another seed."""
    like = gpu_stand_ins(np.zeros(1, np.float32))

    def draws(seed, steps=2):
        noise = BufferNoise(8, like, seed=seed)
        assert noise.gpu_rng is not None, "the GPU path was not taken"
        out = []
        for _ in range(steps):
            noise.refill()
            noise.rewind()
            out.append(np.asarray(noise.normal((8,))).copy())
        return out

    a1, a2 = draws(3)
    assert not np.array_equal(a1, a2), "two steps drew the same noise"
    np.testing.assert_array_equal(draws(3)[0], a1)
    assert not np.array_equal(draws(4)[0], a1)
