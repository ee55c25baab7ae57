"""Arrays on different devices (NumPy on the CPU, CuPy on the GPU) given to one op or
to the model: a TypeError that says so, not CuPy's "Unsupported type" from inside.

Without a GPU the second device is a stand-in: an ndarray subclass that
``get_array_module`` takes for CuPy's array type (``autograd.cupy`` is patched), so the
checks run on CPU-only CI. The gpu-marked test repeats the main cases with real CuPy.
"""
import types

import numpy as np
import pytest

import autograd
import gaussian
import layers
import lvae
from autograd import Tensor
from conftest import requires_cuda


class StandInGpuArray(np.ndarray):
    """What ``get_array_module`` reports as a CuPy array while ``fake_cupy`` is on."""


@pytest.fixture
def fake_cupy(monkeypatch):
    """Make StandInGpuArray count as the GPU's array type; returns a converter."""
    stand_in = types.ModuleType("cupy_stand_in")
    stand_in.ndarray = StandInGpuArray
    stand_in.asarray = lambda a, dtype=None: np.asarray(a, dtype).view(StandInGpuArray)
    stand_in.empty = lambda shape, dtype: np.empty(shape, dtype).view(StandInGpuArray)
    monkeypatch.setattr(autograd, "cupy", stand_in)
    return lambda a: np.asarray(a).view(StandInGpuArray)


MIXED = "on different devices"


def test_check_same_device_ignores_numbers_and_accepts_one_device(fake_cupy):
    autograd.check_same_device("op", np.ones(2), Tensor(np.ones(2)), 3.0)
    autograd.check_same_device("op", fake_cupy(np.ones(2)), Tensor(fake_cupy(np.ones(2))), 1)
    with pytest.raises(TypeError, match=f"op: the inputs are {MIXED}"):
        autograd.check_same_device("op", np.ones(2), fake_cupy(np.ones(2)))


def test_check_same_device_takes_numpy_scalars_but_not_0d_arrays(fake_cupy):
    """CuPy takes a NumPy scalar (np.float32(2)) next to its arrays, but refuses a NumPy
    array of any shape, 0-d included ("Unsupported type <class 'numpy.ndarray'>", from
    CuPy's kernel-argument code): the check must tell the two apart."""
    gpu = Tensor(fake_cupy(np.ones(2)))
    autograd.check_same_device("op", gpu, np.float32(2), np.float64(3), 2.0)
    for scalar in (np.float32(2), np.float64(2), 2.0):  # a scalar operand goes where gpu is
        assert isinstance((gpu * scalar).data, StandInGpuArray)
        assert isinstance((scalar - gpu).data, StandInGpuArray)
    with pytest.raises(TypeError, match=f"mul: the inputs are {MIXED}"):
        autograd.mul(gpu, Tensor(np.array(2.0)))
    with pytest.raises(TypeError, match=f"op: the inputs are {MIXED}"):
        autograd.check_same_device("op", fake_cupy(np.array(1.0)), np.ones(2))


def test_backward_takes_a_numpy_scalar_seed_on_the_gpu(fake_cupy):
    """loss.backward(np.float64(1.0)) on a GPU loss: the seed was made a NumPy 0-d array,
    then refused as a mix of devices, where a CPU loss took it."""
    x = Tensor(fake_cupy(np.array(1.0, np.float32)), requires_grad=True)  # a one-number loss
    (x * 2).backward(np.float64(1.0))
    assert isinstance(x.grad, StandInGpuArray) and x.grad.dtype == np.float32 and x.grad == 2
    with pytest.raises(TypeError, match=f"backward: the inputs are {MIXED}"):
        (x * 2).backward(np.array(1.0))  # a NumPy array is still another device


def test_backward_refuses_a_gpu_seed_for_a_one_number_cpu_loss(fake_cupy):
    """A CPU loss of one number holds a NumPy scalar, which the device check left out: a
    CuPy seed passed and the CPU leaf's .grad came out a CuPy array."""
    x = Tensor(np.array(1.0, np.float32), requires_grad=True)
    loss = x * 2
    assert isinstance(loss.data, np.generic)  # what NumPy gives for 0-d operands
    with pytest.raises(TypeError, match=f"backward: the inputs are {MIXED}"):
        loss.backward(fake_cupy(np.array(1.0)))
    assert x.grad is None


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "matmul"])
def test_binary_ops_name_mixed_devices(fake_cupy, op):
    cpu = Tensor(np.ones((2, 2)), requires_grad=True)
    gpu = Tensor(fake_cupy(np.ones((2, 2))))
    for a, b in ((cpu, gpu), (gpu, cpu)):
        with pytest.raises(TypeError, match=f"{op}: the inputs are {MIXED}"):
            getattr(autograd, op)(a, b)


def test_gaussian_ops_name_mixed_devices(fake_cupy):
    cpu = Tensor(np.ones(3), requires_grad=True)
    gpu = fake_cupy(np.ones(3))  # a plain array is a constant input: checked as well
    with pytest.raises(TypeError, match=f"merge: the inputs are {MIXED}"):
        gaussian.merge(cpu, cpu, gpu, cpu)
    with pytest.raises(TypeError, match=f"gaussian_kl: the inputs are {MIXED}"):
        gaussian.gaussian_kl(cpu, cpu, gpu, 1.0)
    with pytest.raises(TypeError, match=f"log_normal: the inputs are {MIXED}"):
        gaussian.log_normal(gpu, cpu, cpu)


def test_shape_ops_and_the_noise_name_mixed_devices(fake_cupy):
    cpu = Tensor(np.ones((2, 3)), requires_grad=True)
    gpu = Tensor(fake_cupy(np.ones((2, 3))))
    with pytest.raises(TypeError, match=f"concatenate: the inputs are {MIXED}"):
        autograd.concatenate([cpu, gpu], axis=1)
    with pytest.raises(TypeError, match=f"getitem: the inputs are {MIXED}"):
        cpu[Tensor(fake_cupy(np.array([1, 0])))]
    with pytest.raises(TypeError, match=f"reparameterize: the inputs are {MIXED}"):
        gaussian.reparameterize(cpu, cpu, fake_cupy(np.zeros((2, 3))))
    # one device: fine (an integer index, a slice, a NumPy index array)
    assert cpu[np.array([1, 0])].shape == (2, 3) and cpu[0].shape == (3,)
    assert autograd.concatenate([cpu, cpu], axis=1).shape == (2, 6)


def test_dense_and_batch_norm_name_mixed_devices(fake_cupy):
    dense = layers.Dense(3, 2, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match=f"linear: the inputs are {MIXED}"):
        dense(Tensor(fake_cupy(np.ones((4, 3), np.float32))))
    norm = layers.BatchNorm(3)
    with pytest.raises(TypeError, match=f"batch_norm: the inputs are {MIXED}"):
        norm(Tensor(fake_cupy(np.ones((4, 3), np.float32))))


def test_model_names_a_batch_on_another_device(fake_cupy):
    model = lvae.build_model("lvae", x_dim=6, z_dims=(3, 2), hidden=(5, 4), n_dense=1)
    x = fake_cupy(np.full((2, 6), 0.5, np.float32))
    with pytest.raises(TypeError, match="x is on cuda but the model is on cpu: move x "
                                        r"with to_device\(x, 'cpu'\)"):
        model(x, lvae.Noise(0))
    with pytest.raises(TypeError, match="must be a NumPy array here"):
        lvae.log_likelihood_bound(model, x, samples=2)


@pytest.mark.gpu
@requires_cuda
def test_mixed_devices_on_a_real_gpu():
    cupy = autograd.cupy
    with pytest.raises(TypeError, match=f"add: the inputs are {MIXED}"):
        Tensor(np.ones(3)) + Tensor(cupy.ones(3))
    with pytest.raises(TypeError, match=f"mul: the inputs are {MIXED}"):
        Tensor(cupy.ones(3)) * Tensor(np.array(2.0))  # 0-d: CuPy refuses those too
    (Tensor(cupy.ones(3)) * np.float32(2)).data.get()  # a NumPy scalar is taken
    x = Tensor(cupy.ones(3, np.float32), requires_grad=True)
    (x * 2).sum().backward(np.float64(1.0))  # a NumPy scalar seed is taken too
    assert isinstance(x.grad, cupy.ndarray) and x.grad.dtype == np.float32
    with pytest.raises(TypeError, match=f"backward: the inputs are {MIXED}"):
        (Tensor(np.ones(3), requires_grad=True) * 2).sum().backward(cupy.asarray(1.0))
    with pytest.raises(TypeError, match=f"merge: the inputs are {MIXED}"):
        gaussian.merge(Tensor(cupy.ones(3)), cupy.ones(3), np.ones(3), 1.0)
    with pytest.raises(TypeError, match=f"concatenate: the inputs are {MIXED}"):
        autograd.concatenate([Tensor(np.ones(3)), Tensor(cupy.ones(3))])
    with pytest.raises(TypeError, match=f"reparameterize: the inputs are {MIXED}"):
        gaussian.reparameterize(Tensor(np.ones(3)), np.ones(3), cupy.zeros(3))
    model = lvae.build_model("lvae", x_dim=6, z_dims=(3, 2), hidden=(5, 4), n_dense=1)
    x = np.full((2, 6), 0.5, np.float32)
    model.to("cuda")
    with pytest.raises(TypeError, match="x is on cpu but the model is on cuda"):
        model(x, lvae.Noise(0))
    # log_likelihood_bound takes host arrays for a GPU model, as documented
    assert np.isfinite(lvae.log_likelihood_bound(model, x, samples=2)).all()
