"""A CPU stand-in for what kernels.py takes from CuPy: ``cupy.ndarray``,
``cupy.ElementwiseKernel`` and ``cupy.ReductionKernel``, running the real kernel strings
as C on NumPy arrays.

Why. kernels.py's Python wrappers decide which array goes to which kernel parameter,
which outputs come back, which axis a column sum runs over and which dtype a kernel
runs in. Without a GPU none of that would run: tests/test_kernel_bodies.py checks the
kernel bodies, but a wrapper that swapped two arguments would pass every CPU test.
Installed as ``kernels.cupy`` (the ``fake_cupy`` fixture of tests/test_kernels.py), the
stand-in makes NumPy arrays count as "device" arrays, so ``kernels.active`` is true and
gaussian.py, layers.py and autograd.py take their fused paths, through the same kernel
strings a GPU would compile.

How. Each kernel becomes C the way CuPy makes it CUDA (cupy/_core/_kernel.pyx and
_reduction.pyx): ``typedef float T;`` or ``typedef double T;`` for the type placeholder,
the body run once per element with every input a const value and every output a
variable (holding the output array's element) that is written back; a reduction sums
``map_expr`` with ``reduce_expr`` from ``identity`` in the type of its first output, then
runs ``post_map_expr`` with the sum as ``a``. The C is compiled with the machine's C
compiler, with -Wdouble-promotion -Werror (a bare double literal in a float kernel is an
error: it would silently make the float32 GPU kernel compute in double), and called
through ctypes.

CuPy's calling rules kept here, because the wrappers rely on them:
  * T is bound by the array arguments (given outputs first, then inputs); arrays of two
    dtypes for one T raise TypeError. Python and NumPy scalars do not bind T: they are
    cast to it. A parameter with a fixed type (``bool training``) is cast to that type.
  * Arrays broadcast together (an ElementwiseKernel's given outputs too); a given
    output must have the result's shape and is written in place. An output not given is
    a new array: uninitialised in CuPy, NaN here, so a body that reads an output
    before writing it shows up.
  * An ElementwiseKernel returns one output bare and several as a tuple; a
    ReductionKernel returns its first output.
  * A reduction runs over ``axis`` (None: every axis; an int or a tuple of ints), with
    ``keepdims``. In ``post_map_expr`` only the outputs and the scalar inputs are visible:
    CuPy reads array inputs inside the loop over the reduced elements only.
  * ``i`` cannot name a parameter of an ElementwiseKernel.

Where it differs from a GPU, on purpose: CuPy sums a reduction as a tree over threads,
here the elements are added in order (the same type, a different rounding); C's maths
library is not CUDA's (each within an ulp or two); an input that shares memory with an
output is refused rather than modelled; ``raw`` parameters, ``preamble``, ``size=`` and
the other options are not supported (NotImplementedError), as kernels.py does not use
them. Each kernel is compiled for T = float and T = double by one compiler run (about
0.15 s), once: see CBuilder.
"""
import collections
import ctypes
import hashlib
import itertools
import math
import os
import shutil
import subprocess

import numpy as np

# C type and ctypes type of each dtype a kernel parameter may have here
C_TYPES = {
    np.dtype(np.float32): ("float", ctypes.c_float),
    np.dtype(np.float64): ("double", ctypes.c_double),
    np.dtype(np.bool_): ("bool", ctypes.c_bool),
    np.dtype(np.int32): ("int", ctypes.c_int32),
    np.dtype(np.int64): ("long long", ctypes.c_longlong),
}
PLACEHOLDER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # what T may stand for
COMPILE_FLAGS = ["-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-Wdouble-promotion", "-Werror"]


def find_c_compiler():
    """$CC, cc, gcc or clang, whichever is found first; None if none is."""
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


class CBuilder:
    """Compiles C sources into shared libraries in ``folder``, once per distinct source.

    A library is named by a hash of its sources, the compiler (its --version) and the
    flags, so a folder that outlives the session works as a cache, like CuPy's
    ~/.cupy/kernel_cache: a later run loads the library instead of compiling it again.
    """

    def __init__(self, folder, compiler):
        self.folder, self.compiler = str(folder), compiler
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        self._identity = "\0".join([compiler, version, *COMPILE_FLAGS])
        self._libraries = {}

    def build(self, sources):
        """{file stem: C source} compiled together into one library (a ctypes.CDLL)."""
        text = "\0".join([self._identity] + [f"{k}\0{v}" for k, v in sorted(sources.items())])
        key = hashlib.sha1(text.encode()).hexdigest()[:20]
        if key not in self._libraries:
            library = os.path.join(self.folder, f"lib_{key}.so")
            if not os.path.exists(library):
                self._compile(sources, key, library)
            self._libraries[key] = ctypes.CDLL(library)
        return self._libraries[key]

    def _compile(self, sources, key, library):
        paths = []
        for stem, text in sources.items():
            paths.append(os.path.join(self.folder, f"{stem}_{key}.c"))
            with open(paths[-1], "w") as f:
                f.write(text)
        partial = f"{library}.{os.getpid()}.partial"  # renamed once complete
        command = [self.compiler, *COMPILE_FLAGS, "-o", partial, *paths, "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            listing = "\n\n".join(sources.values())
            raise AssertionError(f"the kernel does not compile as C:\n{' '.join(command)}\n"
                                 f"{result.stderr}\n--- source ---\n{listing}")
        os.replace(partial, library)


# ----------------------------------------------------------------------------------
# Parameters, argument checks and CuPy's rule for the type placeholder
# ----------------------------------------------------------------------------------
class Param:
    """One kernel parameter, '<type> <name>': a one-letter type is a placeholder (T)."""

    def __init__(self, text):
        words = text.split()
        if len(words) != 2:
            raise NotImplementedError(f"parameter {text!r}: the stand-in supports "
                                      f"'<type> <name>' only (no raw)")
        type_name, self.name = words
        if len(type_name) == 1:
            self.placeholder, self.dtype = type_name, None
        else:
            self.placeholder, self.dtype = None, np.dtype(type_name)
            if self.dtype not in C_TYPES:
                raise NotImplementedError(f"parameter {text!r}: type not supported here")

    def c_type(self):
        """The name the C code uses for this parameter's type."""
        return self.placeholder or C_TYPES[self.dtype][0]


def parse_params(text):
    """'T x, bool flag' -> [Param, Param]."""
    return [Param(p) for p in text.split(",")] if text.strip() else []


def check_argument(kernel_name, arg):
    """Arrays and real scalars pass; anything else (None, lists, ...) is a TypeError in
    CuPy too (it cannot be turned into a kernel argument)."""
    if isinstance(arg, np.ndarray) or (isinstance(arg, (bool, int, float, np.bool_, np.number))
                                       and not np.iscomplexobj(arg)):
        return arg
    raise TypeError(f"{kernel_name}: unsupported argument of type {type(arg).__name__}")


def decide_types(kernel_name, in_params, out_params, in_args, out_args):
    """The dtype of every input and output parameter, as CuPy's _decide_params_type:
    array arguments bind the placeholders (outputs first), scalars do not."""
    bound = {}
    for p, arg in list(zip(out_params, out_args)) + list(zip(in_params, in_args)):
        if not isinstance(arg, np.ndarray):
            continue
        if p.dtype is not None:
            if arg.dtype != p.dtype:
                raise TypeError(f"Type is mismatched. {kernel_name}: {p.name} is {p.dtype}, "
                                f"got an array of {arg.dtype}")
        elif bound.setdefault(p.placeholder, arg.dtype) != arg.dtype:
            raise TypeError(f"Type is mismatched. {kernel_name}: {p.name} is {p.placeholder} = "
                            f"{bound[p.placeholder]}, got an array of {arg.dtype}")

    def dtype_of(p):
        if p.dtype is not None:
            return p.dtype
        if p.placeholder not in bound:
            raise TypeError(f"{kernel_name}: no array argument tells the type {p.placeholder} "
                            f"of {p.name}")
        return bound[p.placeholder]
    return [dtype_of(p) for p in in_params], [dtype_of(p) for p in out_params], bound


def refuse_aliasing(kernel_name, in_args, out_args):
    for a in in_args:
        if isinstance(a, np.ndarray) and any(np.may_share_memory(a, o) for o in out_args):
            raise NotImplementedError(f"{kernel_name}: an input shares memory with an output; "
                                      f"the stand-in does not model that")


def new_output(shape, dtype):
    """A fresh output: NaN where it can be, so reading an unwritten output is noticed."""
    return np.full(shape, np.nan, dtype) if dtype.kind == "f" else np.zeros(shape, dtype)


def typedefs(placeholders, dtypes):
    return [f"typedef {C_TYPES[d][0]} {p};" for p, d in zip(placeholders, dtypes)]


class _Kernel:
    """What the two kernel classes share: parameters, and one compiled C function per
    choice of dtypes for the placeholders (all of them built by one compiler run)."""

    def __init__(self, standin, in_params, out_params, name, options):
        if options:
            raise NotImplementedError(f"{name}: options {sorted(options)} are not supported "
                                      f"by the stand-in")
        self.standin, self.name = standin, name
        self.in_params, self.out_params = parse_params(in_params), parse_params(out_params)
        self.placeholders = sorted({p.placeholder for p in self.in_params + self.out_params
                                    if p.placeholder})

    def _function(self, bound, variant_key=()):
        """The C function for the placeholders' dtypes in ``bound``."""
        for p, dtype in bound.items():
            if dtype not in PLACEHOLDER_DTYPES:
                raise NotImplementedError(f"{self.name}: {p} = {dtype}: the stand-in builds "
                                          f"float32 and float64 kernels only")
        sources = {}
        for dtypes in itertools.product(PLACEHOLDER_DTYPES, repeat=len(self.placeholders)):
            function = self._function_name(dtypes)
            sources[function] = self._source(function, dtypes, *variant_key)
        library = self.standin.builder.build(sources)
        return getattr(library, self._function_name([bound[p] for p in self.placeholders]))

    def _function_name(self, dtypes):
        return "__".join([self.name] + [C_TYPES[d][0] for d in dtypes])

    def _source(self, function, dtypes, *variant_key):
        raise NotImplementedError


# ----------------------------------------------------------------------------------
# ElementwiseKernel
# ----------------------------------------------------------------------------------
class ElementwiseKernel(_Kernel):
    """cupy.ElementwiseKernel(in_params, out_params, operation, name) on NumPy arrays."""

    def __init__(self, standin, in_params, out_params, operation, name="kernel", **options):
        super().__init__(standin, in_params, out_params, name, options)
        self.operation = operation
        if "i" in [p.name for p in self.in_params + self.out_params]:
            raise ValueError("Can not use 'i' as a parameter name")

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise NotImplementedError(f"{self.name}: keyword arguments {sorted(kwargs)}")
        n_in, n_out = len(self.in_params), len(self.out_params)
        if len(args) not in (n_in, n_in + n_out):
            raise TypeError(f"Wrong number of arguments for {self.name!r}. It must be either "
                            f"{n_in} or {n_in + n_out} (with outputs), but given {len(args)}.")
        args = [check_argument(self.name, a) for a in args]
        in_args, out_args = args[:n_in], args[n_in:]
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        if not arrays:
            raise ValueError("Loop size is undecided.")
        shape = np.broadcast_shapes(*[a.shape for a in arrays])
        in_types, out_types, bound = decide_types(self.name, self.in_params, self.out_params,
                                                  in_args, out_args)
        if any(o.shape != shape for o in out_args):
            raise ValueError(f"Out shape is mismatched ({self.name}: outputs must have the "
                             f"broadcast shape {shape})")
        refuse_aliasing(self.name, in_args, out_args)
        self.standin.launched[self.name] += 1
        outputs = list(out_args) or [new_output(shape, t) for t in out_types]
        size = math.prod(shape)
        if size:
            # every input, scalars too, as a contiguous array of the broadcast shape
            inputs = [np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=t), shape))
                      for a, t in zip(in_args, in_types)]
            buffers = [np.ascontiguousarray(o) for o in outputs]
            self._function(bound)(ctypes.c_long(size),
                                  *[b.ctypes.data_as(ctypes.c_void_p) for b in inputs + buffers])
            for o, b in zip(outputs, buffers):
                if b is not o:
                    o[...] = b
        return outputs[0] if n_out == 1 else tuple(outputs)

    def _source(self, function, dtypes):
        """A loop over the elements: read the inputs, run the body, write the outputs."""
        args = (["long _size"] + [f"const {p.c_type()} *_raw_{p.name}" for p in self.in_params]
                + [f"{p.c_type()} *_raw_{p.name}" for p in self.out_params])
        lines = ["#include <stdbool.h>", "#include <tgmath.h>",
                 *typedefs(self.placeholders, dtypes), "",
                 f"void {function}({', '.join(args)}) {{",
                 "    for (long _idx = 0; _idx < _size; ++_idx) {"]
        lines += [f"        const {p.c_type()} {p.name} = _raw_{p.name}[_idx]; (void){p.name};"
                  for p in self.in_params]
        lines += [f"        {p.c_type()} {p.name} = _raw_{p.name}[_idx];" for p in self.out_params]
        lines += ["        {", self.operation, "        }"]
        lines += [f"        _raw_{p.name}[_idx] = {p.name};" for p in self.out_params]
        lines += ["    }", "}", ""]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------
# ReductionKernel
# ----------------------------------------------------------------------------------
def reduction_axes(axis, ndim):
    """(reduced axes, kept axes) as CuPy's _get_axis: None reduces every axis, negative
    axes count from the end, a repeated axis is an error."""
    if axis is None:
        return tuple(range(ndim)), ()
    reduced = []
    for a in (tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)):
        if not -ndim <= a < ndim:
            raise np.exceptions.AxisError(a, ndim)
        reduced.append(a % ndim)
    if len(set(reduced)) != len(reduced):
        raise ValueError("duplicate value in 'axis'")
    reduced = tuple(sorted(reduced))
    return reduced, tuple(d for d in range(ndim) if d not in reduced)


class ReductionKernel(_Kernel):
    """cupy.ReductionKernel(in_params, out_params, map_expr, reduce_expr, post_map_expr,
    identity, name, reduce_type) on NumPy arrays."""

    def __init__(self, standin, in_params, out_params, map_expr, reduce_expr, post_map_expr,
                 identity, name="reduce_kernel", reduce_type=None, **options):
        super().__init__(standin, in_params, out_params, name, options)
        self.map_expr, self.reduce_expr, self.post_map_expr = map_expr, reduce_expr, post_map_expr
        self.identity = "" if identity is None else str(identity)
        # CuPy: the sum `a` has the type of the first output unless reduce_type is given
        self.reduce_type = reduce_type or self.out_params[0].c_type()

    def __call__(self, *args, axis=None, keepdims=False, out=None, **kwargs):
        if kwargs:
            raise NotImplementedError(f"{self.name}: keyword arguments {sorted(kwargs)}")
        n_in, n_out = len(self.in_params), len(self.out_params)
        if len(args) not in (n_in, n_in + n_out):
            raise TypeError(f"Wrong number of arguments for {self.name}")
        args = [check_argument(self.name, a) for a in args]
        in_args, out_args = args[:n_in], args[n_in:]
        if out is not None:
            if out_args:
                raise ValueError("cannot specify 'out' as both a positional and keyword argument")
            out_args = [out]
        arrays = [a for a in in_args if isinstance(a, np.ndarray)]
        if not arrays:
            raise ValueError("Loop size is undecided.")
        shape = np.broadcast_shapes(*[a.shape for a in arrays])
        in_types, out_types, bound = decide_types(self.name, self.in_params, self.out_params,
                                                  in_args, out_args)
        reduced, kept = reduction_axes(axis, len(shape))
        out_shape = (tuple(1 if d in reduced else n for d, n in enumerate(shape)) if keepdims
                     else tuple(shape[d] for d in kept))
        if any(o.shape != out_shape for o in out_args):
            raise ValueError("Out shape is mismatched")
        refuse_aliasing(self.name, in_args, out_args)
        self.standin.launched[self.name] += 1
        outputs = list(out_args) or [new_output(out_shape, t) for t in out_types]
        n_kept, n_reduced = math.prod(shape[d] for d in kept), math.prod(shape[d] for d in reduced)
        if n_kept == 0:
            return outputs[0]
        if n_reduced == 0 and self.identity == "":
            raise ValueError(f"zero-size array to reduction operation {self.name} which has "
                             f"no identity")
        kinds = tuple(isinstance(a, np.ndarray) for a in in_args)
        call_args = [ctypes.c_long(n_kept), ctypes.c_long(n_reduced)]
        keep = []  # the arrays handed to C, alive until the call returns
        for a, t, is_array in zip(in_args, in_types, kinds):
            if is_array:  # laid out as CuPy does: (reduced axes..., kept axes...), flattened
                a = np.ascontiguousarray(np.broadcast_to(a, shape).transpose(reduced + kept))
                keep.append(a)
                call_args.append(a.ctypes.data_as(ctypes.c_void_p))
            else:
                call_args.append(C_TYPES[t][1](np.asarray(a, dtype=t).item()))
        buffers = [np.ascontiguousarray(o) for o in outputs]
        call_args += [b.ctypes.data_as(ctypes.c_void_p) for b in buffers]
        self._function(bound, (kinds,))(*call_args)
        for o, b in zip(outputs, buffers):
            if b is not o:
                o[...] = b
        return outputs[0]

    def _source(self, function, dtypes, kinds):
        """For each kept position _i: _s = identity, then _s = REDUCE(_s, map_expr) over the
        reduced positions _J (inputs read there), then POST_MAP(_s) sets the outputs.
        Scalar inputs are function parameters, visible everywhere, as in CuPy."""
        args = ["long _n_kept", "long _n_reduced"]
        for p, is_array in zip(self.in_params, kinds):
            args.append(f"const {p.c_type()} *_raw_{p.name}" if is_array
                        else f"const {p.c_type()} {p.name}")
        args += [f"{p.c_type()} *_raw_{p.name}" for p in self.out_params]
        lines = ["#include <stdbool.h>", "#include <tgmath.h>",
                 *typedefs(self.placeholders, dtypes),
                 f"typedef {self.reduce_type} _type_reduce;",
                 f"#define REDUCE(a, b) ({self.reduce_expr})",
                 f"#define POST_MAP(a) ({self.post_map_expr})", "",
                 f"void {function}({', '.join(args)}) {{",
                 "    for (long _i = 0; _i < _n_kept; ++_i) {",
                 f"        _type_reduce _s = (_type_reduce)({self.identity});",
                 "        for (long _J = 0; _J < _n_reduced; ++_J) {",
                 "            const long _j = _J * _n_kept + _i;"]
        lines += [f"            const {p.c_type()} {p.name} = _raw_{p.name}[_j]; (void){p.name};"
                  for p, is_array in zip(self.in_params, kinds) if is_array]
        lines += [f"            _type_reduce _a = (_type_reduce)({self.map_expr});",
                  "            _s = REDUCE(_s, _a);",
                  "        }"]
        lines += [f"        {p.c_type()} {p.name} = _raw_{p.name}[_i];" for p in self.out_params]
        lines += ["        POST_MAP(_s);"]
        lines += [f"        _raw_{p.name}[_i] = {p.name};" for p in self.out_params]
        lines += ["    }", "}", ""]
        return "\n".join(lines)


class CupyStandIn:
    """What kernels.py sees as ``cupy``: NumPy's ndarray and the two kernel classes.

    ``launched`` counts the calls of each kernel by name, so a test can tell that the
    fused path ran (and not the plain code, which would trivially match itself)."""

    def __init__(self, builder):
        self.ndarray = np.ndarray
        self.builder = builder
        self.launched = collections.Counter()

    def ElementwiseKernel(self, *args, **kwargs):  # noqa: N802 (CuPy's name)
        return ElementwiseKernel(self, *args, **kwargs)

    def ReductionKernel(self, *args, **kwargs):  # noqa: N802
        return ReductionKernel(self, *args, **kwargs)
