"""Evaluate a trained checkpoint the way the paper reports results: the
importance-weighted bound L_K (K = 5000) on the test set, with batch-norm statistics
collected over the training set.

    python evaluate.py runs/lvae/ckpt.npz                       # L_5000 on all 10000 test images
    python evaluate.py runs/lvae/ckpt.npz --samples=1000 --images=2000 --device=cuda

Ctrl-C (or `kill`) stops it and prints the bound over the test images finished so far.
"""
import json
import signal
import sys
import time

import numpy as np

import checkpoint
import cli
import data
import lvae
from autograd import check_device, to_device
from layers import recompute_batchnorm_statistics


def load_model(path, device="cpu"):
    """Rebuild the model a checkpoint was trained with and load its weights."""
    config = checkpoint.read_config(path)
    try:
        net = lvae.build_model(config["model"], x_dim=784, z_dims=config["z_dims"],
                               hidden=config["hidden"], n_dense=config["n_dense"],
                               batch_norm=config["batch_norm"], seed=config["seed"])
    except (TypeError, ValueError) as e:  # e.g. z_dims "64,32" or model "lvea" in the file
        raise checkpoint.CheckpointError(f"checkpoint {path} is corrupt: its config does "
                                         f"not describe a model ({e})") from None
    checkpoint.load_weights(path, net)
    return net.to(device), config


def report_partial(bounds, total, samples):
    """After a Ctrl-C: the bound over the images finished, so the time is not all lost."""
    done = sum(len(b) for b in bounds)
    if not done:
        print("\ninterrupted before the first batch of images was done", file=sys.stderr)
        return
    partial = np.concatenate(bounds)
    print(f"\ninterrupted after {done}/{total} images: L_{samples} = {partial.mean():.2f} "
          f"+- {lvae.standard_error(partial):.2f} nats on the first {done} test images "
          f"(not the whole test set)", file=sys.stderr)


def main(argv):
    """Evaluate the checkpoint named in ``argv``; returns the result dict it prints."""
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--samples", type=cli.count(1), default=5000,
                        help="K of L_K (default 5000)")
    parser.add_argument("--images", type=cli.count(0), default=0,
                        help="first N test images (0 = all)")
    parser.add_argument("--batch_size", type=cli.count(1), default=100,
                        help="test images per batch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no_bn_recompute", action="store_true",
                        help="keep the running batch-norm averages from training")
    parser.add_argument("--seed", type=cli.count(0), default=0)
    parser.add_argument("--data_root", default=None,
                        help="folder with the data files (default: the checkpoint's --data_root)")
    args = parser.parse_args(argv)
    try:
        check_device(args.device)
    except RuntimeError as e:  # no CUDA on this machine: say so, no traceback
        raise SystemExit(f"error: {e}") from None

    net, config = load_model(args.checkpoint, args.device)
    root = args.data_root if args.data_root is not None else config.get("data_root")
    if not isinstance(root, (str, type(None))):  # only the checkpoint's can be another type
        raise checkpoint.CheckpointError(f"checkpoint {args.checkpoint} is corrupt: its "
                                         f"data_root is {root!r}, not a folder name")
    try:
        ds = data.load_dataset(config["dataset"], root or None)
    except data.DataError as e:
        if args.data_root is None and root:  # the user gave no --data_root: say whose it is
            raise data.DataError(f"{e}. That folder is the checkpoint's data_root: give "
                                 f"--data_root=FOLDER, or --data_root= (empty) for the "
                                 f"default") from None
        raise
    # more images than the test set holds is an error, not quietly all of them: the user
    # expects the number asked for (0 asks for all), and the result would not be it
    if args.images > len(ds.test_x):
        parser.error(f"argument --images: {args.images} is more than the {len(ds.test_x)} "
                     f"images of the {config['dataset']} test set (0 = all of them)")
    test_x = data.binarized_test_set(ds.test_x)
    if args.images:
        test_x = test_x[:args.images]
    noise = lvae.Noise(args.seed)
    if not args.no_bn_recompute:
        rng = np.random.default_rng(args.seed + 1)  # a stream apart from the noise's
        batches = data.iterate_minibatches(ds.train_x, 1000, rng)
        recompute_batchnorm_statistics(
            net, batches, lambda b: lvae.elbo(net, to_device(b, args.device), noise))

    t0 = time.perf_counter()
    bounds = []  # L_K of every image done so far, a batch at a time
    # one call per batch gives the numbers of one call over all the images (the noise goes
    # on from call to call), and a Ctrl-C keeps the batches already done; folding the batch
    # norms again at every call costs ~5 ms on the CPU, against seconds per batch
    try:
        for start in range(0, len(test_x), args.batch_size):
            bounds.append(lvae.log_likelihood_bound(net, test_x[start:start + args.batch_size],
                                                    args.samples, noise,
                                                    batch_size=args.batch_size))
            done = start + len(bounds[-1])
            rate = done / (time.perf_counter() - t0)
            print(f"\rL_{args.samples}: {done}/{len(test_x)} images, {rate:.1f} images/s, "
                  f"{(len(test_x) - done) / rate:.0f}s left ", end="", flush=True)
    except KeyboardInterrupt:
        report_partial(bounds, len(test_x), args.samples)
        raise SystemExit(130) from None
    bound = np.concatenate(bounds)
    seconds = time.perf_counter() - t0
    stderr = lvae.standard_error(bound)
    result = {"checkpoint": args.checkpoint, "samples": args.samples, "images": len(test_x),
              "test_lk": float(bound.mean()), "seconds": seconds}
    if len(test_x) > 1:  # one image has no spread: NaN, which JSON cannot hold
        result["stderr"] = stderr
    print(f"\n{config['model']}: L_{args.samples} = {result['test_lk']:.2f} "
          f"+- {stderr:.2f} nats on {len(test_x)} test images ({seconds:.0f}s)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    # A bad checkpoint or data file is the user's to fix: print the message alone and
    # exit 1. Anything else is a bug and keeps its traceback. main() returns the result
    # (for tests and notebooks), already printed, so success is exit status 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops like Ctrl-C
    try:
        main(sys.argv[1:])
    except (checkpoint.CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # before the evaluation proper began (loading, batch norm)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
