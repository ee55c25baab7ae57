r"""Train a Ladder VAE (or the bottom-up hierarchical VAE) on dynamically binarised MNIST.

    python train.py                                   # the paper's recipe (2000 epochs)
    python train.py --epochs=10 --warmup=5 --final_lk_samples=1000 --final_lk_images=2000
                                                      # a short run (minutes on a CPU)
    python train.py --model=vae --out_dir=runs/vae    # the baseline
    python train.py --iw_samples=10 --warmup=0 --lr=2e-4 --epochs=10 \
        --init_from=runs/lvae/ckpt.npz --out_dir=runs/lvae-iw   # IW fine-tuning, a new out_dir
    python train.py --device=cuda                     # on a GPU, through CuPy
    python train.py --epochs=200 --decay_lr=true      # not the paper's: lr 2e-3 -> 2e-4 along a cosine

Configuration: the plain values below; override any with --key=value (the type must
match the default's; an unknown key, or one given twice, is an error). Running again
with the same out_dir resumes from its checkpoint, exactly where it stopped (Ctrl-C,
`kill`, closing the terminal or the pipe it prints to saves before exiting); the
architecture must stay the same, and so must --init_from (a fine-tuning run needs its own
out_dir) and, in the middle of an epoch, --batch_size; a change of any other option (a
longer --epochs, a new --lr) is printed when the run resumes. The paper's code also clips
the gradient norm; here that is off unless --clip_norm is set.
"""
import contextlib
import math
import os
import signal
import sys
import threading
import time

import numpy as np

import checkpoint
import data
import lvae
from autograd import check_device, get_array_module, no_grad, to_device
from layers import Adam, first_nonfinite_module, recompute_batchnorm_statistics

# ---------------------------------------------------------------------------- config
model = "lvae"                  # 'lvae' or 'vae'
z_dims = (64, 32, 16, 8, 4)     # stochastic layers, bottom to top
hidden = (512, 256, 128, 64, 32)  # width of each layer's deterministic block
n_dense = 2                     # dense layers per block
batch_norm = True               # on every dense layer but the output
dataset = "mnist"               # 'mnist', 'fashion_mnist' or 'omniglot'
data_root = ""                  # folder with the data files ('' = defaults, see data.py)
epochs = 2000                   # the paper trains up to 2000 epochs
warmup = 200                    # epochs over which beta rises from 0 to 1 (0 = no warm-up;
                                #   must be 0 with iw_samples > 1: L_K has no KL term to weight)
batch_size = 256
lr = 2e-3                       # Adam learning rate (the paper's code README uses 2e-4)
decay_lr = False                # True: the lr falls along a half cosine from lr (first epoch)
                                #   to min_lr (last epoch); False: constant, the paper's recipe
min_lr = 2e-4                   # the last epoch's lr when decay_lr is on
clip_norm = 0.0                 # clip the global gradient norm (0 = off)
iw_samples = 1                  # K > 1 trains on the importance-weighted bound L_K
eval_interval = 50              # epochs between test evaluations (0 = only at the end)
eval_lk_samples = 1000          # K of the test bound L_K in the periodic evaluations (0 = skip)
eval_lk_images = 2000           # first test images used for L_K (0 = all: 10000 for MNIST)
final_lk_samples = 5000         # K of the final evaluation (the paper's L_5000; 0 = skip)
final_lk_images = 0             # test images for the final L_K (0 = all)
bn_recompute = True             # final evaluation: batch-norm statistics over the train set
device = "cpu"                  # 'cpu' or 'cuda'
seed = 0
out_dir = "runs/lvae"
init_from = ""                  # a checkpoint to start from (weights only), e.g. fine-tuning
log_interval = 50               # steps between progress lines within an epoch
# ------------------------------------------------------------------------------------
# the options: the lower-case plain values above (the upper-case tables below are not
# options, and after importlib.reload they are already in globals() at this point)
config_keys = [k for k, v in list(globals().items())
               if k.islower() and not k.startswith("_")
               and isinstance(v, (int, float, bool, str, tuple))]


def usage():
    """This file's docstring and its config block (every option, its default, its comment)."""
    with open(__file__, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ---") and "config" in line)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("# ---"))
    return (__doc__.strip() + "\n\nOptions (--key=value), with their defaults:\n\n"
            + "\n".join(lines[start + 1:end]))


def silence_stdout():
    """Point stdout at /dev/null once the program reading it has gone (a broken pipe), so
    that later prints, and Python's own flush at exit, do not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def stop_report(stop):
    """(stream, word) for the message after a stop: Ctrl-C is reported on stdout; a broken
    pipe, i.e. the program reading our output has gone (`python train.py | head`), on stderr,
    once stdout points at /dev/null."""
    if isinstance(stop, BrokenPipeError):
        silence_stdout()
        return sys.stderr, "stopped: the output was closed (broken pipe)"
    return sys.stdout, "interrupted"


def apply_overrides(args, namespace):
    """--key=value overrides, checked against the defaults' types; returns the keys given."""
    if "--help" in args or "-h" in args:
        try:
            print(usage(), flush=True)
        except BrokenPipeError:  # `python train.py --help | head`: head has read its lines
            silence_stdout()
        raise SystemExit(0)
    given = {}  # key -> the argument that set it
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: arguments look like --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key not in config_keys:
            raise SystemExit(f"error: unknown option {key!r}; valid options: "
                             f"{', '.join(config_keys)} (--help says what each does)")
        if key in given:  # the last one would win without a word: a typo, or an edited command
            raise SystemExit(f"error: --{key} is given twice ({given[key]} and {arg}): "
                             f"give it once")
        given[key] = arg
        default = namespace[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                parsed = value.lower() in ("true", "1")
            elif isinstance(default, tuple):  # 64,32,16 (also as Python writes it: (64, 32, 16))
                text = value.strip()
                if text.startswith("(") and text.endswith(")"):  # one pair; "(4,2" is an error
                    text = text[1:-1]
                items = [v.strip() for v in text.split(",")]
                if items[-1] == "":  # a trailing comma, as in (64,), or nothing at all
                    items.pop()
                parsed = tuple(int(v) for v in items)  # an empty item in between is an error
            elif isinstance(default, float):
                parsed = float(value)
            else:
                parsed = type(default)(value)
        except ValueError:
            kind = {"int": "an integer", "float": "a number", "str": "a string",
                    "bool": "true or false", "tuple": "comma-separated integers"}[type(default).__name__]
            example = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
            raise SystemExit(f"error: --{key} expects {kind} like {example}, got {value!r}") from None
        namespace[key] = parsed
    return set(given)


# options that do nothing while another is off (key, the other, why): a note says so
IDLE_WITHOUT = (
    ("eval_lk_images", "eval_lk_samples", "--eval_lk_samples=0 skips the periodic L_K"),
    ("final_lk_images", "final_lk_samples", "--final_lk_samples=0 skips the final L_K"),
    ("bn_recompute", "batch_norm", "--batch_norm=false leaves no statistics to recompute"))


class ConfigError(ValueError):
    """An option value that cannot work (raised before any data is loaded)."""


# options that must be >= 1, and options that must be >= 0
POSITIVE = ("epochs", "batch_size", "iw_samples", "n_dense")
NON_NEGATIVE = ("warmup", "eval_interval", "eval_lk_samples", "eval_lk_images",
                "final_lk_samples", "final_lk_images", "seed", "log_interval")


def validate_config(config):
    """Reject option values that cannot work, each with a message that names the option."""
    for key in POSITIVE:
        if config[key] < 1:
            raise ConfigError(f"--{key} must be >= 1, got {config[key]}")
    for key in NON_NEGATIVE:
        if config[key] < 0:
            raise ConfigError(f"--{key} must be >= 0, got {config[key]}")
    for key in ("lr", "min_lr", "clip_norm"):  # lr 0 freezes the weights (batch-norm statistics still move)
        if not (math.isfinite(config[key]) and config[key] >= 0):
            raise ConfigError(f"--{key} must be a finite number >= 0, got {config[key]}")
    for key in ("z_dims", "hidden"):
        if not config[key] or min(config[key]) < 1:
            example = {"z_dims": "64,32,16,8,4", "hidden": "512,256,128,64,32"}[key]
            raise ConfigError(f"--{key} must list one size >= 1 per stochastic layer, e.g. "
                              f"--{key}={example}; got {config[key]}")
    if len(config["z_dims"]) != len(config["hidden"]):
        raise ConfigError(f"--z_dims has {len(config['z_dims'])} layers and --hidden "
                          f"{len(config['hidden'])}: give one hidden width per stochastic layer")
    if config["model"] not in lvae.MODELS:
        raise ConfigError(f"unknown model {config['model']!r}: choose one of {sorted(lvae.MODELS)}")
    if config["decay_lr"] and config["min_lr"] > config["lr"]:
        raise ConfigError(f"--min_lr={config['min_lr']} is above --lr={config['lr']}: with "
                          f"--decay_lr the lr falls from --lr to --min_lr")
    if config["iw_samples"] > 1 and config["warmup"] > 0:
        raise ConfigError("--warmup weights the ELBO's KL terms, and the importance-weighted "
                          f"bound (--iw_samples={config['iw_samples']}) has none: add --warmup=0")
    if not config["out_dir"]:
        raise ConfigError("--out_dir must name a folder")
    if os.path.exists(config["out_dir"]) and not os.path.isdir(config["out_dir"]):
        raise ConfigError(f"--out_dir={config['out_dir']} is a file, not a folder")
    if config["warmup"] >= config["epochs"]:  # beta of the last epoch: (epochs - 1) / warmup
        print(f"note: --warmup={config['warmup']} is not shorter than --epochs={config['epochs']}: "
              f"beta only reaches {(config['epochs'] - 1) / config['warmup']:.2f}")


# options whose change does not matter to a resumed run (the architecture is checked by checkpoint.load)
_ANY_ON_RESUME = ("out_dir", "log_interval", "device")


def check_resume(saved, config, step):
    """Options given now against those the checkpoint was trained with: refuse the changes
    that would silently do something else, print the others."""
    def norm(v):
        return tuple(v) if isinstance(v, list) else v
    changed = {k: (norm(saved[k]), config[k]) for k in config
               if k in saved and norm(saved[k]) != config[k] and k not in _ANY_ON_RESUME}
    if changed.get("init_from", ("", ""))[1] == "":  # resuming: the weights are the checkpoint's
        changed.pop("init_from", None)
    if "init_from" in changed:
        old, new = changed["init_from"]
        raise ConfigError(
            f"{config['out_dir']} already holds a run started with init_from={old!r}; resuming it "
            f"would ignore --init_from={new!r}. Give the new run its own --out_dir.")
    if step > 0 and "batch_size" in changed:
        old, new = changed["batch_size"]
        raise ConfigError(
            f"the checkpoint stopped after step {step} of an epoch in batches of {old}; resume "
            f"with --batch_size={old} (the batch size can change once that epoch is done)")
    if changed:
        print("resuming with changed options: " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))


def beta_for(epoch):
    """Deterministic warm-up: beta rises linearly from 0 to 1 over `warmup` epochs."""
    return 1.0 if warmup <= 0 else min(1.0, epoch / warmup)


def lr_for(epoch):
    """The learning rate of epoch ``epoch`` (0 = the first): ``lr`` throughout (the paper's
    recipe), or with --decay_lr a half cosine from ``lr`` at the first epoch to ``min_lr``
    at the last:

        lr_e = min_lr + (lr - min_lr) (1 + cos(pi e / (epochs - 1))) / 2

    Large steps early, while the model is far from a good optimum; small ones at the end,
    where a constant lr keeps the weights jittering around it. Measured (README, Results):
    +1.2 nats of test ELBO after 30 epochs, +0.3 after 200. A function of the epoch alone,
    so a resumed run continues on the same curve."""
    if not decay_lr or epochs == 1:
        return lr
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * epoch / (epochs - 1))) / 2


def test_elbo(net, test_x, noise):
    """Mean test ELBO in evaluation mode, with the batch norms' current statistics: their
    running averages during training (the per-epoch lines), statistics recomputed over the
    training set in finalize (the final line), so the two differ for the same weights."""
    totals, n = 0.0, 0
    xp = get_array_module(net.output.weight.data)
    with lvae.evaluation(net):
        for start in range(0, len(test_x), 1000):
            xb = xp.asarray(test_x[start:start + 1000])
            _, terms = lvae.elbo(net, xb, noise)
            totals += float(terms["elbo"]) * len(xb)
            n += len(xb)
    return totals / n


def _as_floats(terms):
    return float(terms["log_px"]), float(terms["elbo"]), [float(k) for k in terms["kl"]]


def check_finite(pending, ckpt_path, locate=None):
    """Stop with a message naming the term that is NaN or inf, if one is, the step that
    made it, and where it first appeared (``locate()``: a description from re-running the
    latest step, see locate_nonfinite), and saying what is kept.

    ``pending``: (terms, batch size, "epoch E, step S") of the steps not yet checked: on a
    GPU the terms are read back every log_interval steps, so there may be several."""
    for index, (terms, n, where) in enumerate(pending):
        log_px, elbo_value, kls = _as_floats(terms)
        # keep the numbers read back (from a GPU, each is a copy): add_terms reads them again
        pending[index] = ({"log_px": log_px, "elbo": elbo_value, "kl": kls}, n, where)
        named = [("the reconstruction term log p(x|z1)", log_px),
                 *((f"the KL term of layer z{i + 1}", k) for i, k in enumerate(kls))]
        bad = [name for name, v in named if not math.isfinite(v)]
        if bad:
            if index == len(pending) - 1:  # the latest step: its forward pass can be re-run
                found = f"; {locate()}" if locate else ""
            else:
                found = (f"; found {len(pending) - 1 - index} step(s) later, when the terms were "
                         f"read back from the GPU (every --log_interval steps)")
            kept = (f"the last good checkpoint is kept in {ckpt_path}" if os.path.exists(ckpt_path)
                    else "nothing was saved yet")
            raise FloatingPointError(f"{where}: {bad[0]} became NaN or inf{found}. Stopped: {kept}. "
                                     f"Try a lower --lr or set --clip_norm.")


def check_weights_finite(net, where, ckpt_path, optimizer=None):
    """Stop before saving weights that hold NaN or inf: they would replace the last good
    checkpoint with one that cannot be resumed. (The terms are checked before the update,
    at every step on the CPU and every log_interval steps on a GPU; this catches an update
    that itself made a weight NaN, e.g. the last of an epoch, whose result no forward pass
    has seen yet.) With ``optimizer``, Adam's m and v
    too: checkpoint.load refuses them non-finite, and a squared gradient can overflow v
    to inf while the weights stay finite."""
    tensors = [(name, t.data) for name, t in net.named_tensors()]
    if optimizer is not None:  # Adam's i-th m and v belong to the i-th parameter
        for (name, _), m, v in zip(net.named_parameters(), optimizer.m, optimizer.v):
            tensors += [(f"Adam's m of {name}", m), (f"Adam's v of {name}", v)]
    for name, data in tensors:
        if not bool(get_array_module(data).isfinite(data).all()):
            kept = (f"the last good checkpoint is kept in {ckpt_path}" if os.path.exists(ckpt_path)
                    else "nothing was saved yet")
            raise FloatingPointError(f"{where}: the update made {name} NaN or inf. Stopped "
                                     f"before saving: {kept}. Try a lower --lr or set --clip_norm.")


def add_terms(sums, pending, ckpt_path):
    """Add the pending per-step terms to the epoch's sums (as Python floats), after
    checking them (check_finite)."""
    check_finite(pending, ckpt_path)
    for terms, n, _ in pending:
        log_px, elbo_value, kls = _as_floats(terms)
        sums["elbo"] += elbo_value * n
        sums["log_px"] += log_px * n
        sums["kl"] = [s + k * n for s, k in zip(sums["kl"], kls)]
        sums["n"] += n
    pending.clear()


def training_objective(net, xb, noise, beta):
    """The training objective of this run (to be maximised) and its terms."""
    if iw_samples > 1:
        return lvae.iw_bound(net, xb, noise, iw_samples)
    return lvae.elbo(net, xb, noise, beta)


def locate_nonfinite(net, xb, noise, noise_state, beta):
    """Where a NaN of this step came from: its forward pass again, on the same batch with
    the same noise, with every module's output checked (layers.first_nonfinite_module)."""
    def forward():
        noise.set_state(noise_state)
        with no_grad():
            training_objective(net, xb, noise, beta)
    name = first_nonfinite_module(net, forward)
    if name is None:
        return ("every layer's output was finite: it arose in the terms computed from them "
                "(the Gaussian merge, the KL or the likelihood)")
    if name.startswith("parameter"):
        return f"the {name} already held NaN or inf"
    kind = type(dict(net.named_modules()).get(name, net)).__name__
    return f"it first appeared in the output of {name or 'the model'} ({kind})"


# the signals that stop training with a checkpoint: Ctrl-C, and when run as a script
# SIGTERM (`kill`, a job scheduler's notice) and SIGHUP (the terminal was closed), which
# the script makes raise KeyboardInterrupt too (Windows has no SIGHUP)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (and SIGTERM, SIGHUP) until the block is done: a training step is done whole
    (forward pass, batch-norm statistics, optimiser update, noise drawn) or not at all,
    so the checkpoint saved on Ctrl-C is exactly the state between two steps."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals do not reach this thread
        return
    # only signals that Python handles (ignored or default-action ones are left alone)
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS if callable(signal.getsignal(s))}
    received = []
    for s in previous:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for s in received:
        signal.raise_signal(s)  # delivered now (the handler raises KeyboardInterrupt)


def progress_text(epoch, step):
    """Where a checkpoint stands, numbered as the progress lines are (epochs from 1)."""
    if step:
        return f"epoch {epoch + 1}, after step {step}"
    return f"the end of epoch {epoch}" if epoch else "the start"


def epoch_on_device(batches, device):
    """Every batch of an epoch, moved to the device in one copy (a list of views).

    On a GPU, copying each batch from ordinary (pageable) host memory makes the host wait
    until the GPU has finished the work queued before the copy: host and GPU would take
    turns at every step instead of working at the same time. One copy per epoch avoids
    that. The batches are the same arrays, drawn in the same order from the same generator.
    """
    batches = list(batches)
    on_device = to_device(np.concatenate(batches), device)
    ends = np.cumsum([len(b) for b in batches])
    return [on_device[end - len(b):end] for b, end in zip(batches, ends)]


def main(argv):
    """Options, then data, model and checkpoint, then the epoch loop (its training step is
    the one under `with deferred_interrupt(), ...`), then finalize(). Most of the rest
    is stopping cleanly: Ctrl-C, NaN checks, resuming."""
    given = apply_overrides(argv, globals())
    config = {k: globals()[k] for k in config_keys}
    if data_root:  # stored absolute: evaluate.py may run from another folder
        config["data_root"] = os.path.abspath(data_root)
    validate_config(config)
    if "min_lr" in given and not decay_lr:  # the lr would stay --lr, without a word
        raise ConfigError(f"--min_lr is the last epoch's lr of --decay_lr=true, which is off: "
                          f"add --decay_lr=true, or leave out --min_lr")
    for key, switch, why in IDLE_WITHOUT:  # harmless, but the user may think it did something
        if key in given and not config[switch]:
            print(f"note: --{key} has no effect: {why}")
    try:
        check_device(device)
    except (ValueError, RuntimeError) as e:  # an unknown name, or no usable CUDA device
        raise ConfigError(f"--device={device}: {e}") from None
    ckpt_path = os.path.join(out_dir, "ckpt.npz")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")

    # data: grey levels; training batches are binarised afresh each epoch
    ds = data.load_dataset(dataset, data_root or None)
    test_x = data.binarized_test_set(ds.test_x)
    lk_images = test_x[:eval_lk_images] if eval_lk_images else test_x
    # more images for L_K than the test set holds: all of them are used, as with 0, and a
    # note says so (not an error, as evaluate.py --images is: the default 2000 may exceed
    # a small test set the user chose)
    for key, samples in (("eval_lk_images", eval_lk_samples),
                         ("final_lk_images", final_lk_samples)):
        if samples and config[key] > len(test_x):  # (with no L_K, no images are used)
            print(f"note: --{key}={config[key]}, but the {dataset} test set has "
                  f"{len(test_x)} images: all of them are used")
    if batch_norm and 1 in (batch_size, len(ds.train_x) % batch_size):
        raise ConfigError(f"--batch_size={batch_size}: with batch norm every batch needs 2 "
                          f"images or more, and {len(ds.train_x)} training images leave a "
                          f"batch of 1")

    # model, optimiser, random streams
    net = lvae.build_model(model, x_dim=ds.train_x.shape[1], z_dims=z_dims, hidden=hidden,
                           n_dense=n_dense, batch_norm=batch_norm, seed=seed)
    if device == "cuda":
        net.to("cuda")
    optimizer = Adam(net.parameters(), lr=lr, clip_norm=clip_norm or None)
    noise = lvae.Noise(seed + 1)
    data_rng = np.random.default_rng(seed + 2)
    state = {"epoch": 0, "step": 0, "sums": None, "data_rng": data_rng.bit_generator.state}
    history = []
    if os.path.exists(ckpt_path):
        state, history = checkpoint.load(ckpt_path, net, optimizer, noise, config)
        print(f"resuming from {ckpt_path}: {progress_text(state['epoch'], state['step'])}")
        check_resume(checkpoint.read_config(ckpt_path), config, state["step"])
        if state["step"] and state["epoch"] >= epochs:  # its weights are past epoch `epochs`'s end
            raise ConfigError(
                f"the checkpoint stopped in epoch {state['epoch'] + 1}, after step "
                f"{state['step']}: its weights are not those of the end of epoch {epochs}; "
                f"resume with --epochs={state['epoch'] + 1} or more to finish that epoch")
        # the checkpoint's history is the truth: a stop between writing it and the metrics
        # file would otherwise leave the file an epoch short
        checkpoint.write_metrics(metrics_path, history)
    elif init_from:
        checkpoint.load_weights(init_from, net, config)
        print(f"initialised weights from {init_from}")
    print(f"{model}: {sum(p.size for p in net.parameters()):,} parameters, {dataset} "
          f"{ds.train_x.shape[0]} train / {ds.test_x.shape[0]} test, device {device}")
    os.makedirs(out_dir, exist_ok=True)  # only now: a run that cannot start leaves no folder
    final_path = os.path.join(out_dir, "final.json")
    if state["epoch"] < epochs and os.path.exists(final_path):
        # it describes the weights of an earlier end (a shorter --epochs): not this run's
        os.remove(final_path)
        print(f"removed {final_path}: it was written at an earlier end of this run")
    if state["epoch"] >= epochs:  # e.g. the same command run again, or other --final_lk_*
        print(f"the checkpoint holds {state['epoch']} epochs and --epochs={epochs}: nothing to "
              f"train, only the final evaluation runs again (a larger --epochs trains on)")

    def save(epoch, step, sums, epoch_rng_state):
        check_weights_finite(net, f"epoch {epoch + 1 if step else epoch}", ckpt_path, optimizer)
        checkpoint.save(ckpt_path, net, optimizer, noise, config, history,
                        {"epoch": epoch, "step": step, "sums": sums, "data_rng": epoch_rng_state})

    steps_per_epoch = math.ceil(len(ds.train_x) / batch_size)
    if state["step"] > steps_per_epoch:
        raise checkpoint.CheckpointError(
            f"checkpoint {ckpt_path} is corrupt: it stopped after step {state['step']} of an "
            f"epoch of {steps_per_epoch} steps; {checkpoint.RESUME_ADVICE}")
    epoch = state["epoch"]
    try:
        while epoch < epochs:
            # the data stream of an epoch is fixed by the generator's state at its start,
            # so a resumed epoch replays the same batches and skips the ones already done
            data_rng.bit_generator.state = state["data_rng"]
            epoch_rng_state = state["data_rng"]
            beta, first_step = beta_for(epoch), state["step"]
            optimizer.lr = lr_for(epoch)
            sums = state["sums"] or {"elbo": 0.0, "log_px": 0.0, "kl": [0.0] * net.n_layers, "n": 0}
            pending = []  # per-step terms not yet added to sums
            t0 = time.perf_counter()
            batches = data.iterate_minibatches(ds.train_x, batch_size, data_rng)
            if device == "cuda":
                batches = epoch_on_device(batches, device)
            for step, batch in enumerate(batches):
                if step < first_step:
                    continue
                # Ctrl-C lands between steps, never inside one. NumPy's overflow warnings are
                # silenced: every NaN or inf they foretell is caught, in the terms below or in
                # the weights and Adam's state before saving, and reported better (where it
                # arose, what to do)
                with deferred_interrupt(), np.errstate(all="ignore"):
                    noise.new_step()
                    noise_state = noise.get_state()  # to replay this step if it goes wrong
                    xb = to_device(batch, device)
                    # the step: forward pass (objective), backward pass, Adam update
                    objective, terms = training_objective(net, xb, noise, beta)
                    pending.append((terms, len(batch), f"epoch {epoch + 1}, step {step + 1}"))
                    # reading numbers back from a GPU waits for it: there, every log_interval steps
                    # (every 50 with --log_interval=0, which only turns the progress lines off)
                    read_back = device == "cpu" or (step + 1) % (log_interval or 50) == 0
                    if read_back:  # before the update, while the weights that made a NaN are intact
                        check_finite(pending, ckpt_path,
                                     lambda: locate_nonfinite(net, xb, noise, noise_state, beta))
                    optimizer.zero_grad()
                    (-objective).backward()  # Adam descends: minimise minus the objective
                    optimizer.step()
                    if read_back:
                        add_terms(sums, pending, ckpt_path)
                    # what the `except` below saves on a stop; its "pending" key marks
                    # steps done since the last checkpoint (the epoch's save drops it)
                    state = {"epoch": epoch, "step": step + 1, "sums": sums, "pending": pending}
                if log_interval and (step + 1) % log_interval == 0:
                    rate = (time.perf_counter() - t0) / (step + 1 - first_step)
                    print(f"  epoch {epoch + 1} step {step + 1}/{steps_per_epoch}: train elbo "
                          f"{sums['elbo'] / sums['n']:.2f} ({rate * 1000:.1f} ms/step)", flush=True)
            with deferred_interrupt():
                add_terms(sums, pending, ckpt_path)
                check_weights_finite(net, f"epoch {epoch + 1}", ckpt_path)  # before evaluating
            # an epoch resumed after Ctrl-C also counts the time spent on it before the stop
            seconds = sums.get("seconds", 0.0) + time.perf_counter() - t0
            epoch += 1
            n = sums["n"]
            record = {"epoch": epoch, "beta": beta, "lr": optimizer.lr,
                      "train_elbo": sums["elbo"] / n, "train_log_px": sums["log_px"] / n,
                      "kl": [k / n for k in sums["kl"]], "seconds": seconds}
            kl_text = " ".join(f"{k:.2f}" for k in record["kl"])
            lr_text = f"lr {optimizer.lr:.2e}, " if decay_lr else ""
            line = (f"epoch {epoch}: beta {beta:.2f}, {lr_text}train elbo {record['train_elbo']:.2f}, "
                    f"KL per layer (z1..z{net.n_layers}) {kl_text}, {seconds:.1f}s")
            if eval_interval and epoch % eval_interval == 0 or epoch == epochs:
                # evaluations draw their own noise: when (and whether) they run must not
                # change the training stream, so that a resumed run continues identically
                record["test_elbo"] = test_elbo(net, test_x, lvae.Noise(seed + 4))
                line += f" | test elbo {record['test_elbo']:.2f} (running BN averages)"
                if eval_lk_samples:
                    record["test_lk"] = float(lvae.log_likelihood_bound(
                        net, lk_images, eval_lk_samples, lvae.Noise(seed + 5)).mean())
                    record["lk_samples"] = eval_lk_samples
                    record["lk_images"] = len(lk_images)
                    line += f", L_{eval_lk_samples} {record['test_lk']:.2f} ({len(lk_images)} images)"
            print(line, flush=True)
            with deferred_interrupt():  # a Ctrl-C here would leave the epoch done but unsaved
                history.append(record)
                save(epoch, 0, None, data_rng.bit_generator.state)
                checkpoint.write_metrics(metrics_path, history)
                state = {"epoch": epoch, "step": 0, "sums": None,
                         "data_rng": data_rng.bit_generator.state}
    except (KeyboardInterrupt, BrokenPipeError) as stop:
        # a broken pipe (`python train.py | head`) stops and saves as Ctrl-C does
        report, why = stop_report(stop)
        if "pending" in state:  # steps were done since the last save
            saved = False
            try:
                with deferred_interrupt():  # a second Ctrl-C waits until this is saved
                    add_terms(state["sums"], state["pending"], ckpt_path)
                    state["sums"]["seconds"] = (state["sums"].get("seconds", 0.0)
                                                + time.perf_counter() - t0)
                    # stopped during the end-of-epoch evaluation: the epoch is recorded on resuming
                    del history[state["epoch"]:]
                    save(state["epoch"], state["step"], state["sums"], epoch_rng_state)
                    saved = True
            except (OSError, KeyboardInterrupt) as e:
                # after the save: a second Ctrl-C, held until it was done; before: it failed
                if not saved:  # e.g. the disk is full
                    kept = (f"{ckpt_path} still holds the previous one"
                            if os.path.exists(ckpt_path) else "nothing saved yet")
                    print(f"\n{why}, and the checkpoint could not be written ({e!r}): "
                          f"{kept}", file=report)
                    return 1
        where = (f"{ckpt_path} holds {progress_text(state['epoch'], state['step'])}; run the "
                 f"same command again to resume" if os.path.exists(ckpt_path) else "nothing saved yet")
        print(f"\n{why}: {where}", file=report)
        return 1
    try:
        finalize(net, ds, test_x, noise, history)
    except (KeyboardInterrupt, BrokenPipeError) as stop:
        report, why = stop_report(stop)
        print(f"\n{why} during the final evaluation: training is complete and saved in "
              f"{ckpt_path}; run the same command again to redo the final evaluation",
              file=report)
        return 1
    return 0


def finalize(net, ds, test_x, noise, history):
    """Plots, and the final evaluation the way the paper reports it."""
    import plots
    net.train()
    xp_x = lambda a: to_device(a, device)
    if history:
        plots.learning_curves(history, os.path.join(out_dir, "learning_curves.png"))
        plots.kl_per_layer(history, os.path.join(out_dir, "kl_per_layer.png"), units=list(z_dims))
    rng = np.random.default_rng(seed + 3)
    if bn_recompute:
        batches = data.iterate_minibatches(ds.train_x, 1000, rng, drop_last=False)
        recompute_batchnorm_statistics(net, batches, lambda b: lvae.elbo(net, xp_x(b), noise))
    kl_units = lvae.kl_per_unit(net, test_x[:2000], noise)
    activity, counts = lvae.active_units(net, test_x[:2000], noise)
    plots.kl_per_unit(kl_units, os.path.join(out_dir, "kl_per_unit.png"), activity=activity)
    plots.image_grid(lvae.sample_prior(net, 100, noise), os.path.join(out_dir, "samples.png"),
                     title="samples from the model")
    plots.reconstructions(test_x[:10], lvae.reconstruct(net, test_x[:10], noise),
                          os.path.join(out_dir, "reconstructions.png"))
    # Burda's activity counts a unit of the LVAE whose q is its prior as active when the
    # layer above moves its mean. The KL bounds what a unit tells about x: 0.01 nats or
    # less means it carries at most that. (A KL above it may still carry nothing, e.g. a q
    # that differs from the prior in the same way for every x.)
    informative = [int((k > 0.01).sum()) for k in kl_units]
    result = {"epoch": history[-1]["epoch"] if history else 0, "active_units": counts,
              "informative_units": informative, "test_elbo": test_elbo(net, test_x, noise)}
    print(f"final: test elbo {result['test_elbo']:.2f} (batch-norm statistics "
          f"{'recomputed over the training set' if bn_recompute else 'from training'}), "
          f"active units per layer {counts}, units with KL > 0.01 nats {informative}")
    if final_lk_samples:
        images = test_x[:final_lk_images] if final_lk_images else test_x
        t0 = time.perf_counter()
        bound = lvae.log_likelihood_bound(
            net, images, final_lk_samples, noise,
            progress=lambda done, total: print(f"\r  L_{final_lk_samples}: {done}/{total} images",
                                               end="", flush=True))
        # the standard error of the mean over images: how far another test set could move it
        stderr = lvae.standard_error(bound)
        result.update(test_lk=float(bound.mean()), lk_samples=final_lk_samples,
                      lk_images=len(images))
        if len(images) > 1:  # one image has no spread: NaN, which JSON cannot hold
            result["stderr"] = stderr
        print(f"\nfinal: L_{final_lk_samples} {result['test_lk']:.2f} +- {stderr:.2f} on "
              f"{len(images)} test images ({time.perf_counter() - t0:.0f}s)")
    checkpoint.write_json(os.path.join(out_dir, "final.json"), result)
    print(f"wrote {out_dir}/: ckpt.npz, metrics.jsonl, final.json, *.png")


if __name__ == "__main__":
    for stop in STOP_SIGNALS[1:]:  # `kill`, a closed terminal: they stop like Ctrl-C,
        if signal.getsignal(stop) is signal.SIG_DFL:  # unless ignored (nohup ignores SIGHUP)
            signal.signal(stop, signal.default_int_handler)
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, checkpoint.CheckpointError, data.DataError, FloatingPointError) as e:
        # errors that name their cause: the message is the whole story, no traceback needed
        sys.exit(f"error: {e}")
    except BrokenPipeError:  # the output was closed before training started: nothing lost
        silence_stdout()
        sys.exit("error: the output was closed (broken pipe) before training started")
    except OSError as e:  # e.g. the disk is full: the message names the file
        sys.exit(f"error: {e}")
    except MemoryError as e:  # e.g. --hidden=100000000: NumPy says how much it wanted
        sys.exit(f"error: out of memory ({e}); try smaller --hidden, --z_dims or --batch_size")
    except KeyboardInterrupt:  # while loading data or the checkpoint: nothing was written
        sys.exit("interrupted before training started")
