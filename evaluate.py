"""Evaluate a trained checkpoint the way the paper reports results: the importance-
weighted bound L_K (K = 5000) on the test set, with batch-norm statistics collected over
the training set.

    python evaluate.py runs/lvae/ckpt.npz                       # L_5000 on all 10000 test images
    python evaluate.py runs/lvae/ckpt.npz --samples=1000 --images=2000 --device=cuda
"""
import argparse
import json
import sys
import time

import numpy as np

import checkpoint
import data
import lvae
from autograd import check_device, to_device
from layers import recompute_batchnorm_statistics


def load_model(path, device="cpu"):
    """Rebuild the model a checkpoint was trained with and load its weights."""
    config = checkpoint.read_config(path)
    net = lvae.build_model(config["model"], x_dim=784, z_dims=config["z_dims"],
                           hidden=config["hidden"], n_dense=config["n_dense"],
                           batch_norm=config["batch_norm"], seed=config["seed"])
    checkpoint.load_weights(path, net)
    return net.to(device), config


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--samples", type=int, default=5000, help="K of L_K (default 5000)")
    parser.add_argument("--images", type=int, default=0, help="first N test images (0 = all)")
    parser.add_argument("--batch_size", type=int, default=100, help="test images per batch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no_bn_recompute", action="store_true",
                        help="keep the running batch-norm averages from training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_device(args.device)

    net, config = load_model(args.checkpoint, args.device)
    ds = data.load_dataset(config["dataset"], config.get("data_root") or None)
    test_x = data.binarized_test_set(ds.test_x)
    if args.images:
        test_x = test_x[:args.images]
    noise = lvae.Noise(args.seed)
    if not args.no_bn_recompute:
        rng = np.random.default_rng(args.seed)
        batches = data.iterate_minibatches(ds.train_x, 1000, rng)
        recompute_batchnorm_statistics(
            net, batches, lambda b: lvae.elbo(net, to_device(b, args.device), noise))

    t0 = time.perf_counter()

    def progress(done, total):
        rate = done / (time.perf_counter() - t0)
        print(f"\rL_{args.samples}: {done}/{total} images, {rate:.1f} images/s, "
              f"{(total - done) / rate:.0f}s left ", end="", flush=True)

    bound = lvae.log_likelihood_bound(net, test_x, args.samples, noise,
                                      batch_size=args.batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    result = {"checkpoint": args.checkpoint, "samples": args.samples, "images": len(test_x),
              "test_lk": float(bound.mean()), "stderr": float(bound.std() / np.sqrt(len(bound))),
              "seconds": seconds}
    print(f"\n{config['model']}: L_{args.samples} = {result['test_lk']:.2f} "
          f"+- {result['stderr']:.2f} nats on {len(test_x)} test images ({seconds:.0f}s)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
