"""A small reverse-mode automatic differentiation engine over arrays.

Read this file top to bottom: it is the whole engine.

* A ``Tensor`` wraps an array (NumPy on the CPU, CuPy on a CUDA GPU) in ``.data``.
* Every operation computes its output array *and* a ``backward`` closure that, given
  the gradient of the final scalar with respect to the output, ``g = dL/d(out)``,
  returns the gradient with respect to each input (the chain rule, one op at a time):

      dL/d(input) = g * d(out)/d(input)          (elementwise ops)

  The forward and the backward of each op sit next to each other.
* ``loss.backward()`` sorts the recorded graph topologically (without recursion, so a
  chain of thousands of ops is fine) and runs the closures once each, from the loss
  back to the leaves, adding up the contributions of every path (fan-out).
* Broadcasting: when ``a`` of shape (3, 1) meets ``b`` of shape (4,), the output has
  shape (3, 4), and the gradient for ``a`` is summed back to (3, 1) by ``sum_to``.

Gradients are plain arrays (``t.grad``), accumulated on leaf tensors that were made
with ``requires_grad=True``; treat them as read-only (several may share memory).
Nothing is recorded inside ``with no_grad():``.

New ops are written with ``record(out_array, parents, backward)``: see any op below.
"""
import contextlib
import numbers
import re

import numpy as np

import kernels  # fused GPU versions of a few array functions (used only for CuPy arrays)


# ----------------------------------------------------------------------------------
# Which NumPy, and whether CuPy can be used (plumbing: the engine starts at Tensor)
# ----------------------------------------------------------------------------------
def check_numpy_version(version):
    """An ImportError for NumPy 1.x: its promotion rules differ from NumPy 2's (NEP 50),
    which the ops and the fused kernels follow (under 1.x a float32 0-d array divided by a
    Python number becomes float64, so dtypes would drift and differ between CPU and GPU)."""
    major = int(version.split(".")[0])
    if major < 2:
        raise ImportError(f"this code needs NumPy 2.0 or newer, found NumPy {version}: "
                          f"pip install -r requirements.txt")


check_numpy_version(np.__version__)

# CuPy 14 is the first release with NumPy 2's promotion rules (NEP 50; cupy pull 8323).
# CuPy 13 keeps NumPy 1's value-based rules: a float32 array divided by a Python int of
# 65536 or more comes out float64 (cupy issue 7630), as under NumPy 1, which is refused
# above for the same reason. (Older still: 13.2's RandomState.seed refuses every int
# under NumPy 2, cupy issue 8392, and 13.0 and 13.1 do not import with it.)
MIN_CUPY_VERSION = (14, 0)


def cupy_version_problem(version):
    """Why CuPy ``version`` cannot be used here (a sentence), or None if it can."""
    major_minor = re.match(r"(\d+)\.(\d+)", version)  # "14.0.0rc1" -> 14, 0
    if major_minor and tuple(map(int, major_minor.groups())) < MIN_CUPY_VERSION:
        return (f"CuPy {version} is too old: CuPy 14.0 or newer is needed, the first with "
                f"NumPy 2's dtype promotion (pip install -U cupy-cuda12x)")
    return None


try:  # CuPy is optional: importing it works without a driver, so also ask for a device.
    import cupy
    _CUDA_PROBLEM = cupy_version_problem(cupy.__version__)
    if _CUDA_PROBLEM is None and not cupy.cuda.is_available():
        _CUDA_PROBLEM = "CuPy finds no working CUDA device (check `nvidia-smi`)"
except ModuleNotFoundError:
    cupy = None
    _CUDA_PROBLEM = "CuPy is not installed (pip install \"cupy-cuda12x>=14\")"
except Exception as error:  # a broken CUDA or CuPy install: say what it was, use NumPy only
    cupy = None
    _CUDA_PROBLEM = f"CuPy is installed but failed to import ({type(error).__name__}: {error})"
_CUDA_AVAILABLE = _CUDA_PROBLEM is None

DEFAULT_DTYPE = np.float32


# ----------------------------------------------------------------------------------
# Backend: numpy or cupy, picked from the data
# ----------------------------------------------------------------------------------
def cuda_available():
    """True when CuPy (14.0 or newer) is installed and a CUDA device can be used;
    ``cuda_problem()`` says why not."""
    return _CUDA_AVAILABLE


def cuda_problem():
    """Why CUDA cannot be used here (a sentence), or None when it can."""
    return _CUDA_PROBLEM


def get_array_module(x):
    """The array module (numpy or cupy) that owns ``x`` (an array or a Tensor)."""
    if isinstance(x, Tensor):
        x = x.data
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy
    return np


def check_device(device):
    """Validate a device name ('cpu' or 'cuda') and return it."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    if device == "cuda" and not _CUDA_AVAILABLE:
        raise RuntimeError(f"device 'cuda' was asked for, but CUDA is not available here: "
                           f"{_CUDA_PROBLEM}; use device='cpu'")
    return device


def check_same_device(op, *inputs):
    """A TypeError naming ``op`` when its inputs (arrays or Tensors) are on different
    devices. CuPy does not mix with NumPy: without this check the error would come from
    inside CuPy and speak of unsupported types. Python numbers and NumPy scalars
    (np.float32(2)) are left out, as CuPy takes them anywhere; a NumPy array is checked
    whatever its shape, 0-d included, since CuPy refuses those too. Where CuPy is not
    installed there is nothing to mix, and the check returns at once."""
    if cupy is None:
        return
    on_gpu = set()
    for x in inputs:
        data = x.data if isinstance(x, Tensor) else x
        if isinstance(data, (np.ndarray, cupy.ndarray)):
            on_gpu.add(isinstance(data, cupy.ndarray))
    if len(on_gpu) > 1:
        raise TypeError(f"{op}: the inputs are on different devices, some NumPy arrays "
                        f"(CPU), some CuPy arrays (GPU); move them to one device first "
                        f"(to_device(x, 'cuda'), or model.to('cpu'))")


def to_device(x, device):
    """Move an array to 'cpu' (NumPy) or 'cuda' (CuPy); a no-op when already there."""
    check_device(device)
    if device == "cpu":
        return to_numpy(x)
    return cupy.asarray(x)


def to_numpy(x):
    """A NumPy array with the values of ``x`` (array, Tensor, or number)."""
    if isinstance(x, Tensor):
        x = x.data
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy.asnumpy(x)
    return np.asarray(x)


# ----------------------------------------------------------------------------------
# Recording switch
# ----------------------------------------------------------------------------------
_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside this block ops record no graph (evaluation, sampling, optimiser steps)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


# ----------------------------------------------------------------------------------
# The Tensor
# ----------------------------------------------------------------------------------
class Tensor:
    """An array plus what is needed to differentiate through it.

    data:          the array (numpy.ndarray or cupy.ndarray)
    grad:          dL/d(data) after ``backward()`` (leaf tensors only), else None
    requires_grad: whether gradients flow to this tensor
    """
    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "name")
    __array_ufunc__ = None  # make `ndarray * Tensor` call Tensor.__rmul__

    def __init__(self, data, requires_grad=False, name=None):
        # input checks (NUMERIC_KINDS and _MISLEADING_ARRAYS are defined further down);
        # the fields are set at the end
        try:  # cheap enough for every op's output (~0.1 us); refuses None, str, object arrays
            numeric = data.dtype.kind in NUMERIC_KINDS
        except AttributeError:
            numeric = False
        if not numeric:
            raise TypeError(f"Tensor data must be a NumPy or CuPy array of numbers, got "
                            f"{_describe(data)}; tensor() converts lists and numbers")
        # a plain ndarray (nearly every call) skips the slower isinstance over subclasses
        if type(data) is not np.ndarray and isinstance(data, _MISLEADING_ARRAYS):
            raise TypeError(f"Tensor data must be a plain array, got {type(data).__name__}: "
                            f"{_MISLEADING_ARRAYS_WHY}")
        if requires_grad and data.dtype.kind != "f":  # else grads and updates round to integers
            raise TypeError(f"a Tensor with requires_grad=True must hold floating-point numbers, "
                            f"got dtype {data.dtype}: the gradient of an integer or boolean "
                            f"is meaningless; convert first (tensor(data) gives float32)")
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._parents = ()
        self._backward = None  # None for leaves
        self.name = name

    # array-like attributes
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        extra = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{extra})"

    def item(self):
        """The value of a one-element tensor as a Python float."""
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return float(self.data.reshape(()))

    def numpy(self):
        return to_numpy(self.data)

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def backward(self, grad=None):
        """Accumulate dL/d(leaf) into ``leaf.grad`` for every leaf this tensor depends on.

        ``grad`` is dL/d(self); it may be left out only when self holds one number.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: "
                               "no input was made with requires_grad=True, or it was "
                               "computed inside no_grad()")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a seed gradient needs a scalar, but this tensor "
                    f"has shape {self.shape}: reduce it first (e.g. loss.sum() or "
                    f"loss.mean()) or pass backward(grad) with an array of that shape")
            grad = get_array_module(self.data).ones_like(self.data)
        else:
            # a Tensor seed would flow through the closures and make every leaf's .grad a
            # Tensor; a list has no shape to check (it was reported as "shape None")
            grad = grad.data if isinstance(grad, Tensor) else grad
            if isinstance(grad, np.generic):  # np.float64(1.0) for a one-number loss
                # made an array where this tensor is: CuPy takes NumPy scalars, but a
                # NumPy 0-d array next to CuPy arrays is a mix of devices
                grad = get_array_module(self.data).asarray(grad)
            if not isinstance(grad, get_array_module(grad).ndarray):
                raise TypeError(f"backward(grad): grad must be an array of shape {self.shape}, "
                                f"got {type(grad).__name__}")
            if grad.shape != self.shape:
                raise ValueError(f"backward(grad): grad has shape {grad.shape}, expected "
                                 f"{self.shape}")
            # self.data as an array: a one-number loss on the CPU holds a NumPy scalar
            # ((x * 2).sum()), which check_same_device leaves out, so a CuPy seed passed
            check_same_device("backward", get_array_module(self.data).asarray(self.data), grad)
            # the seed takes this tensor's dtype, as numbers do: a float64 seed would make
            # every gradient of a float32 model float64 (and an integer one, integers)
            grad = grad.astype(self.dtype, copy=False)

        # The seed is checked; the engine's core starts here. grads maps each node (by id)
        # to dL/d(node) summed so far. The reversed topological order visits a node only
        # after every op that used it, so its sum is complete when it is popped (and the
        # pop frees it as we go).
        grads = {id(self): grad}
        for node in reversed(_topological_order(self)):
            g = grads.pop(id(node), None)
            if g is None:  # no gradient reached it: the ops that used it returned None
                continue
            if node._backward is None:  # a leaf: keep the gradient
                node.grad = g if node.grad is None else node.grad + g
                continue
            for parent, pg in zip(node._parents, node._backward(g)):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                # `+` and not `+=`: the first gradient may be a view shared with another op
                grads[key] = pg if key not in grads else grads[key] + pg

    # Python operators
    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __rtruediv__(self, other): return div(other, self)
    def __neg__(self): return neg(self)
    def __pow__(self, exponent): return power(self, exponent)
    def __matmul__(self, other): return matmul(self, other)
    def __rmatmul__(self, other): return matmul(other, self)
    def __getitem__(self, index): return getitem(self, index)

    # methods for the common reductions and shape ops
    def sum(self, axis=None, keepdims=False): return sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return mean(self, axis, keepdims)
    def reshape(self, *shape): return reshape(self, shape[0] if len(shape) == 1 else shape)
    def transpose(self, *axes):  # t.transpose(1, 0) or t.transpose((1, 0)), as in NumPy
        return transpose(self, axes[0] if len(axes) == 1 and not np.isscalar(axes[0])
                         else axes or None)
    T = property(lambda self: transpose(self))
    def exp(self): return exp(self)
    def log(self): return log(self)


def _topological_order(root):
    """Nodes reachable from root, each after all of its parents (iterative DFS)."""
    order, visited = [], set()
    # each node is pushed twice: (node, False) to push its parents, then (node, True),
    # popped once they are all in `order`, to append the node itself
    stack = [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    return order


def tensor(data, requires_grad=False, dtype=None):
    """Make a Tensor from an array, list or number. Floating-point data keeps NumPy's dtype
    for it: a float32 array stays float32, but a Python float or a list of floats is
    float64 (pass ``dtype=np.float32`` to feed it to a float32 model, or the results are
    promoted to float64). Integers and booleans become float32 (DEFAULT_DTYPE)."""
    if isinstance(data, Tensor):
        data = data.data
    xp = get_array_module(data)
    array = _numeric_array(data)
    if dtype is None:
        dtype = array.dtype if array.dtype.kind == "f" else DEFAULT_DTYPE
    return Tensor(xp.asarray(array, dtype=dtype), requires_grad=requires_grad)


def as_tensor(x, like=None):
    """Tensors pass through; a number, Python or NumPy scalar (2.0, np.float64(2)), next to
    the floating-point Tensor ``like`` becomes a constant with its dtype, on its device (as
    PyTorch treats numbers): a float32 model stays float32 on both devices. (NumPy 2 would
    make float32 * np.float64(2) float64, and a float64 gradient then meets the float32
    fused GPU kernels.) Next to an integer or boolean ``like`` a number promotes as in
    NumPy 2 instead (int64 and 0.5 give float64): cast to int64, 0.5 would be 0.
    A NumPy *array* does not move: mixing devices is an error."""
    if isinstance(x, Tensor):
        return x
    if like is not None and (not hasattr(x, "shape") or isinstance(x, np.generic)):
        array = _numeric_array(x)
        dtype = like.dtype
        if dtype.kind != "f":  # a Python number is "weak" here: int32 and 2 stay int32
            dtype = np.result_type(dtype, x if np.isscalar(x) else array)
            if dtype.kind in "iu" and isinstance(x, int) and not (
                    np.iinfo(dtype).min <= x <= np.iinfo(dtype).max):  # the cast would wrap
                raise OverflowError(f"Python integer {x} out of bounds for {dtype}")
        xp = get_array_module(like.data)  # one copy to the GPU, already in its final dtype
        return Tensor(xp.asarray(array, dtype=dtype))
    return tensor(x)


def as_input(op, x):
    """A tensor input of ``op``: a Tensor passes through, a NumPy or CuPy array becomes a
    constant (as next to a binary op; integer and boolean arrays, e.g. pixels, become
    float32, as ``tensor()`` makes them), and anything else is a TypeError naming op,
    rather than an AttributeError from inside it."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, get_array_module(x).ndarray):
        return tensor(x)
    raise TypeError(f"{op}: expected a Tensor or an array, got {type(x).__name__} "
                    f"(tensor() converts lists and numbers)")


NUMERIC_KINDS = "biuf"  # dtype kinds bool, int, unsigned, float: what arithmetic takes
# NumPy subclasses whose arithmetic would silently differ from the ops' maths
_MISLEADING_ARRAYS = (np.matrix, np.ma.MaskedArray)
_MISLEADING_ARRAYS_WHY = ("a np.matrix's * is a matrix product, and a masked array's mask "
                          "would be ignored by the ops; convert with np.asarray(x), or for "
                          "a masked array x.filled(value)")


def _describe(x):
    """e.g. 'numpy.ndarray of dtype int64' (the module too: NumPy and CuPy arrays are both
    called ndarray), or the start of repr(x)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return repr(x)[:60]
    module = type(x).__module__.split(".")[0]
    return f"{module}.{type(x).__name__} of dtype {dtype}"


def _numeric_array(x):
    """x itself if it is an array (NumPy or CuPy) or a NumPy scalar, else x as a NumPy
    array (a number or a list: checked on the host, before any copy to a GPU); refused
    unless it holds numbers (None would become NaN, and a string an array no op can use)."""
    if isinstance(x, _MISLEADING_ARRAYS):
        raise TypeError(f"expected a plain array, got {type(x).__name__}: "
                        f"{_MISLEADING_ARRAYS_WHY}")
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        array = x
    else:
        try:
            array = np.asarray(x)
        except (TypeError, ValueError) as e:  # e.g. a ragged list
            raise TypeError(f"expected numbers (a Tensor, an array, a list or a number), got "
                            f"{_describe(x)}: {e}") from None
    if array.dtype.kind not in NUMERIC_KINDS:
        raise TypeError(f"expected numbers (a Tensor, an array, a list or a number), got "
                        f"{_describe(x)}")
    return array


def record(data, parents, backward):
    """Wrap an op's output array; remember how to differentiate it if needed.

    backward(g) must return one gradient (array or None) per parent, each of the
    parent's shape. Nothing is kept when recording is off or no parent needs a grad.
    """
    out = Tensor(data)
    if _grad_enabled:
        for p in parents:
            if p.requires_grad:
                out.requires_grad = True
                out._parents = parents
                out._backward = backward
                break
    return out


class _Slots(list):
    """The gradients of the outputs of a multi-output op, one slot each (None: none yet).

    A list whose + adds slot by slot: Tensor.backward sums the gradients that reach a
    node with +, and for a plain list + would concatenate the two lists.
    """

    def __add__(self, other):
        return _Slots(a if b is None else b if a is None else a + b for a, b in zip(self, other))


_NO_VALUE = np.empty(0)  # the data of record_multi's joint nodes (no array, no GPU work)


def record_multi(datas, parents, backward):
    """Like ``record`` for an op with several outputs that share one backward pass.

    backward(grads) gets one gradient per output (None where an output got none) and
    returns one gradient per parent. A hidden joint node collects the outputs' grads.

    The graph is  parents -> joint -> each output.  Output i's backward returns a list
    (a ``_Slots``) with its g in slot i and None elsewhere; Tensor.backward adds these
    lists at the joint as it adds any two gradients, so the joint's backward, the op's
    ``backward``, gets all the outputs' gradients at once.
    """
    outs = [Tensor(d) for d in datas]
    if not (_grad_enabled and any(p.requires_grad for p in parents)):
        return outs
    joint = Tensor(_NO_VALUE, requires_grad=True)  # a node for the graph; its data is never read
    joint._parents, joint._backward = parents, backward
    n = len(outs)
    for i, out in enumerate(outs):
        out.requires_grad, out._parents = True, (joint,)
        # i=i binds this output's index now (the closure alone would see the loop's last i)
        out._backward = lambda g, i=i: (_Slots(g if j == i else None for j in range(n)),)
    return outs


def sum_to(g, shape):
    """Sum a broadcast gradient back down to ``shape`` (undoes NumPy broadcasting)."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)  # dimensions that broadcasting added in front
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _pair(op, a, b):
    """Both operands as Tensors; a number takes the other operand's dtype."""
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        raise TypeError(f"{op}: at least one operand must be a Tensor")
    a = as_tensor(a, like=b if isinstance(b, Tensor) else None)
    b = as_tensor(b, like=a)
    check_same_device(op, a, b)
    return a, b


def _broadcast_error(op, a, b):
    return ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together")


# ----------------------------------------------------------------------------------
# Elementwise binary ops (with broadcasting)
# ----------------------------------------------------------------------------------
def add(a, b):
    """a + b;  d/da = 1, d/db = 1."""
    a, b = _pair("add", a, b)
    try:
        out = a.data + b.data
    except ValueError:
        raise _broadcast_error("add", a, b) from None

    def backward(g):
        return (sum_to(g, a.shape) if a.requires_grad else None,
                sum_to(g, b.shape) if b.requires_grad else None)
    return record(out, (a, b), backward)


def sub(a, b):
    """a - b;  d/da = 1, d/db = -1."""
    a, b = _pair("sub", a, b)
    try:
        out = a.data - b.data
    except ValueError:
        raise _broadcast_error("sub", a, b) from None

    def backward(g):
        return (sum_to(g, a.shape) if a.requires_grad else None,
                sum_to(-g, b.shape) if b.requires_grad else None)
    return record(out, (a, b), backward)


def mul(a, b):
    """a * b;  d/da = b, d/db = a."""
    a, b = _pair("mul", a, b)
    try:
        out = a.data * b.data
    except ValueError:
        raise _broadcast_error("mul", a, b) from None

    def backward(g):
        return (sum_to(g * b.data, a.shape) if a.requires_grad else None,
                sum_to(g * a.data, b.shape) if b.requires_grad else None)
    return record(out, (a, b), backward)


def div(a, b):
    """a / b;  d/da = 1/b, d/db = -a/b^2 = -out/b."""
    a, b = _pair("div", a, b)
    try:
        out = a.data / b.data
    except ValueError:
        raise _broadcast_error("div", a, b) from None

    def backward(g):
        g_over_b = g / b.data
        return (sum_to(g_over_b, a.shape) if a.requires_grad else None,
                sum_to(-g_over_b * out, b.shape) if b.requires_grad else None)
    return record(out, (a, b), backward)


def matmul(a, b):
    """a @ b for 2-D (or batched, leading dims broadcast) operands.

    d/da = g @ b^T,  d/db = a^T @ g   (transposes of the last two axes)
    """
    a, b = _pair("matmul", a, b)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not fit: both need "
                         f"at least 2 dimensions and a.shape[-1] must equal b.shape[-2]")
    try:
        out = a.data @ b.data
    except ValueError:
        raise _broadcast_error("matmul", a, b) from None

    def backward(g):
        ga = gb = None
        if a.requires_grad:
            ga = sum_to(g @ b.data.swapaxes(-1, -2), a.shape)
        if b.requires_grad:
            # the weight of a dense layer: fold batch dims into rows, one product instead of
            # a stack of per-batch products for sum_to to add up
            if b.ndim == 2:
                gb = a.data.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            else:
                gb = sum_to(a.data.swapaxes(-1, -2) @ g, b.shape)
        return ga, gb
    return record(out, (a, b), backward)


def neg(x):
    """-x."""
    x = as_input("neg", x)
    return record(-x.data, (x,), lambda g: (-g,))


def power(x, exponent):
    """x ** p for a constant number p;  d/dx = p * x^(p-1)."""
    if not isinstance(exponent, numbers.Real):  # np.isscalar would pass a string
        raise TypeError(f"power: the exponent must be a number (Tensor ** Tensor is not "
                        f"supported), got {type(exponent).__name__}")
    x = as_input("power", x)
    out = x.data ** exponent
    return record(out, (x,), lambda g: (g * exponent * x.data ** (exponent - 1),))


# ----------------------------------------------------------------------------------
# Elementwise unary ops
# ----------------------------------------------------------------------------------
def exp(x):
    """e^x;  d/dx = e^x (the output itself)."""
    x = as_input("exp", x)
    out = get_array_module(x.data).exp(x.data)
    return record(out, (x,), lambda g: (g * out,))


def log(x):
    """natural log;  d/dx = 1/x."""
    x = as_input("log", x)
    out = get_array_module(x.data).log(x.data)
    return record(out, (x,), lambda g: (g / x.data,))


def log1p(x):
    """log(1 + x), accurate for small x;  d/dx = 1/(1 + x)."""
    x = as_input("log1p", x)
    out = get_array_module(x.data).log1p(x.data)
    return record(out, (x,), lambda g: (g / (1 + x.data),))


def sqrt(x):
    """sqrt(x);  d/dx = 1/(2 sqrt(x))."""
    x = as_input("sqrt", x)
    out = get_array_module(x.data).sqrt(x.data)
    return record(out, (x,), lambda g: (g * 0.5 / out,))


def square(x):
    """x^2;  d/dx = 2x."""
    x = as_input("square", x)
    out = x.data * x.data
    return record(out, (x,), lambda g: (g * 2 * x.data,))


def sigmoid_array(x):
    """1 / (1 + e^-x) on a raw array, without overflow: 0.5 * (1 + tanh(x/2))."""
    if kernels.active(x):
        return kernels.sigmoid(x)
    xp = get_array_module(x)
    out = xp.tanh(x * 0.5)
    out += 1
    out *= 0.5
    return out


def softplus_array(x):
    """log(1 + e^x) on a raw array, stable for large |x|: max(x, 0) + log1p(e^-|x|)."""
    if kernels.active(x):
        return kernels.softplus(x)
    xp = get_array_module(x)
    out = xp.exp(-xp.abs(x))
    xp.log1p(out, out=out)
    out += xp.maximum(x, 0)
    return out


def sigmoid(x):
    """sigma(x) = 1/(1 + e^-x);  d/dx = sigma(x) (1 - sigma(x))."""
    x = as_input("sigmoid", x)
    out = sigmoid_array(x.data)
    return record(out, (x,), lambda g: (g * out * (1 - out),))


def softplus(x):
    """log(1 + e^x), stable for large |x|;  d/dx = sigma(x)."""
    x = as_input("softplus", x)
    out = softplus_array(x.data)
    return record(out, (x,), lambda g: (g * sigmoid_array(x.data),))


def leaky_relu(x, slope=0.01):
    """x if x > 0 else slope * x;  d/dx = 1 or slope (slope 0.01 as Lasagne's leaky_rectify).

    Written as max(x, slope x) and a 0/1 mask times (1 - slope) plus slope: boolean
    selection (np.where) is ten times slower than this arithmetic on NumPy.
    """
    if not isinstance(slope, numbers.Real):
        raise TypeError(f"leaky_relu: slope must be a number, got {slope!r}")
    if not 0 <= slope < 1:
        raise ValueError(f"leaky_relu: slope must be in [0, 1), got {slope}")
    x = as_input("leaky_relu", x)
    xp = get_array_module(x.data)
    out = xp.maximum(x.data, x.data * slope)

    def backward(g):
        scale = (x.data > 0).astype(g.dtype)  # 1 where x > 0, else 0
        scale *= 1 - slope
        scale += slope                        # 1 where x > 0, else slope
        scale *= g
        return (scale,)
    return record(out, (x,), backward)


# ----------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------
def _axes(op, shape, axis, name="axis"):
    """``axis`` (None, an int, or a tuple or list of ints) as a tuple of axes of ``shape``
    counted from 0 (None stays None: all axes). An axis the shape does not have, or one
    given twice, is an error naming op, the argument (``name``), its value and the shape,
    not NumPy's from deep inside."""
    if axis is None:
        return None
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if not all(isinstance(a, (int, np.integer)) for a in axes):
        raise TypeError(f"{op}: {name} must be an int or a tuple of ints, got {axis!r}")
    if not all(-len(shape) <= a < len(shape) for a in axes):
        raise ValueError(f"{op}: {name} {axis} is out of range for shape {shape}")
    axes = tuple(int(a) % len(shape) for a in axes)  # -1 -> the last axis
    if len(set(axes)) < len(axes):
        raise ValueError(f"{op}: {name} {axis} names an axis twice (shape {shape})")
    return axes


def _expand_reduced(g, shape, axes, keepdims):
    """Broadcast the gradient of a reduction back over the reduced axes (from _axes)."""
    if axes is not None and not keepdims:
        g = get_array_module(g).expand_dims(g, axes)
    return get_array_module(g).broadcast_to(g, shape)


def sum(x, axis=None, keepdims=False):  # noqa: A001 (shadows builtins.sum on purpose, like np.sum)
    """Sum over axis (all axes if None);  d/dx = 1 for every summed element."""
    x = as_input("sum", x)
    axes = _axes("sum", x.shape, axis)
    out = x.data.sum(axis=axes, keepdims=keepdims)
    return record(out, (x,), lambda g: (_expand_reduced(g, x.shape, axes, keepdims),))


def mean(x, axis=None, keepdims=False):
    """Mean over axis;  d/dx = 1/n for each of the n averaged elements."""
    x = as_input("mean", x)
    axes = _axes("mean", x.shape, axis)
    out = x.data.mean(axis=axes, keepdims=keepdims)
    n = x.data.size // max(out.size, 1)
    return record(out, (x,), lambda g: (_expand_reduced(g / n, x.shape, axes, keepdims),))


def logsumexp(x, axis=None, keepdims=False):
    """log sum_i e^{x_i}, computed as m + log sum_i e^{x_i - m} with m = max x (no overflow).

    d/dx_i = e^{x_i - out} (the softmax).
    """
    x = as_input("logsumexp", x)
    axes = _axes("logsumexp", x.shape, axis)
    if 0 in (x.shape if axes is None else [x.shape[a] for a in axes]):
        raise ValueError(f"logsumexp: cannot reduce shape {x.shape} over axis {axis}: an "
                         f"axis of length 0 has no maximum to shift by")
    xp = get_array_module(x.data)
    m = x.data.max(axis=axes, keepdims=True)
    # a row of all -inf: the forward gives -inf instead of inf - inf = nan (its gradient,
    # the softmax of all -inf, is undefined and stays nan)
    m = xp.where(xp.isfinite(m), m, 0)
    out_kept = xp.log(xp.exp(x.data - m).sum(axis=axes, keepdims=True)) + m
    out = out_kept if keepdims else out_kept.reshape(
        () if axes is None else [n for i, n in enumerate(x.shape) if i not in axes])

    def backward(g):
        return (g.reshape(out_kept.shape) * xp.exp(x.data - out_kept),)
    return record(out, (x,), backward)


# ----------------------------------------------------------------------------------
# Shape ops
# ----------------------------------------------------------------------------------
def reshape(x, shape):
    """Same values, new shape;  the gradient is reshaped back."""
    x = as_input("reshape", x)
    try:
        out = x.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape {x.shape} into {shape}") from None
    return record(out, (x,), lambda g: (g.reshape(x.shape),))


def transpose(x, axes=None):
    """Permute axes (reverse them if None);  the gradient is permuted back."""
    x = as_input("transpose", x)
    if axes is not None:
        # (-1, 0, 1) -> (2, 0, 1): argsort needs these, and a % ndim alone would take
        # axis 5 of a 2-D x for axis 1
        given, axes = axes, _axes("transpose", x.shape, axes, name="axes")
        if len(axes) != x.ndim:
            raise ValueError(f"transpose: axes {given} are not an order of all the "
                             f"{x.ndim} axes of shape {x.shape}")
    out = x.data.transpose(axes)
    inverse = None if axes is None else tuple(np.argsort(axes))
    return record(out, (x,), lambda g: (g.transpose(inverse),))


def getitem(x, index):
    """x[index] (slices, integers, integer arrays);  the gradient is scattered back."""
    x = as_input("getitem", x)
    if isinstance(index, Tensor):
        index = index.data
        if index.dtype.kind == "f":  # NumPy's IndexError would not say where the floats came from
            raise TypeError(f"getitem: a Tensor index must hold integers or booleans, got "
                            f"{index.dtype} (tensor() makes integers and booleans float32): "
                            f"index with the array itself, e.g. x[np.array([0, 2])]")
    check_same_device("getitem", x, index)  # an index array must live where x does
    out = x.data[index]

    def backward(g):
        xp = get_array_module(g)
        full = xp.zeros(x.shape, dtype=g.dtype)
        xp.add.at(full, index, g)  # adds every repeated index (CuPy >= 12 has add.at too)
        return (full,)
    return record(out, (x,), backward)


def concatenate(tensors, axis=0):
    """Join tensors along an axis;  each gets its slice of the gradient back."""
    if isinstance(tensors, Tensor) or hasattr(tensors, "shape"):  # would be joined row by row
        raise TypeError(f"concatenate: expected a list or tuple of tensors, got "
                        f"{type(tensors).__name__}")
    tensors = tuple(as_input("concatenate", t) for t in tensors)  # a list, tuple, generator...
    if not tensors:
        raise ValueError("concatenate: expected at least one tensor, got none")
    check_same_device("concatenate", *tensors)
    if not isinstance(axis, (int, np.integer)):
        raise TypeError(f"concatenate: axis must be an int, got {axis!r}")
    _axes("concatenate", tensors[0].shape, axis)
    xp = get_array_module(tensors[0].data)
    try:
        out = xp.concatenate([t.data for t in tensors], axis=axis)
    except ValueError:  # a different ndim, or a different length on another axis
        shapes = ", ".join(str(t.shape) for t in tensors)
        raise ValueError(f"concatenate: shapes {shapes} must match on every axis but "
                         f"axis {axis}") from None
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]
    return record(out, tensors, lambda g: tuple(xp.split(g, bounds, axis=axis)))


# ----------------------------------------------------------------------------------
# Likelihoods
# ----------------------------------------------------------------------------------
def bernoulli_log_prob(logits, x):
    """log Bernoulli(x | sigma(logits)) elementwise, = x * logits - softplus(logits).

    Stable for any logit. d/dlogits = x - sigma(logits); d/dx = logits.
    """
    logits, x = _pair("bernoulli_log_prob", logits, x)
    if logits.shape != x.shape:
        raise ValueError(f"bernoulli_log_prob: logits {logits.shape} and targets "
                         f"{x.shape} must have the same shape")
    out = x.data * logits.data - softplus_array(logits.data)

    def backward(g):
        return (g * (x.data - sigmoid_array(logits.data)) if logits.requires_grad else None,
                g * logits.data if x.requires_grad else None)
    return record(out, (logits, x), backward)


# ----------------------------------------------------------------------------------
# Gradient checking (used by the tests and the exercises)
# ----------------------------------------------------------------------------------
def numerical_gradient(f, arrays, index, eps=1e-6):
    """Central finite differences of the scalar f(*arrays) w.r.t. arrays[index].

    df/dx_j ~ (f(x + eps e_j) - f(x - eps e_j)) / (2 eps); use float64 arrays.
    """
    x = arrays[index]
    # x is nudged in place: an integer array would truncate x +- eps to integers (the
    # gradient of x^2 at [1, 2] came out [500000, 1500000]); a list has no shape to walk
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise TypeError(f"numerical_gradient: arrays[{index}] must be a floating-point NumPy "
                        f"array (float64 for accuracy), got {_describe(x)}")
    grad = np.zeros_like(x)
    for j in np.ndindex(x.shape):  # index x itself: reshape(-1) would copy a strided x
        saved = x[j]
        x[j] = saved + eps
        plus = float(f(*arrays))
        x[j] = saved - eps
        minus = float(f(*arrays))
        x[j] = saved
        grad[j] = (plus - minus) / (2 * eps)
    return grad


def check_gradients(fn, *arrays, eps=1e-6, rtol=1e-5, atol=1e-7):
    """Compare backward() of sum(fn(*tensors) * w) with finite differences.

    ``fn`` maps Tensors to a Tensor; a fixed random weighting ``w`` makes every output
    element matter. Raises AssertionError naming the input and the worst entry; returns
    the list of (analytic, numerical) gradient pairs when all agree.
    """
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    probe = fn(*[Tensor(a) for a in arrays])
    if not isinstance(probe, Tensor):  # e.g. fn returned out.data: "no attribute 'backward'"
        raise TypeError(f"check_gradients: fn must return a Tensor, got {_describe(probe)}")
    weights = np.random.default_rng(0).standard_normal(probe.shape)

    def scalar(*arrs):
        with no_grad():
            return float((fn(*[Tensor(a) for a in arrs]).data * weights).sum())

    leaves = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*leaves)
    # an output that records no graph (fn used .data or detach()) gets no gradient to its
    # inputs: backward() gives 0, compared below, not "no input was made with requires_grad"
    if out.requires_grad:
        out.backward(weights.astype(out.dtype).reshape(out.shape))
    pairs = []
    for i, leaf in enumerate(leaves):
        numeric = numerical_gradient(scalar, arrays, i, eps)
        analytic = np.zeros_like(numeric) if leaf.grad is None else to_numpy(leaf.grad)
        if not np.allclose(analytic, numeric, rtol=rtol, atol=atol):
            worst = np.unravel_index(np.argmax(np.abs(analytic - numeric)), numeric.shape)
            raise AssertionError(
                f"gradient of input {i} is wrong: at index {tuple(int(w) for w in worst)} "
                f"backward() gives {analytic[worst]:.6g}, finite differences give "
                f"{numeric[worst]:.6g}")
        pairs.append((analytic, numeric))
    return pairs
