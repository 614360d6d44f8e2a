"""The pipeline's commands, the parser half: data, train-native, train, index build/calibrate,
classify, certify, export, demo. Their handlers (dundi.cli.data_handlers,
dundi.cli.pipeline_handlers) load when a command runs; this module imports no torch."""

from __future__ import annotations

import argparse
import os

from dundi.cli.args import (
    add_two_step_args,
    fraction,
    handler,
    nonnegative_float,
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
    unit_float,
)
from dundi.cli.index_cmds import register as register_index_changes
from dundi.cli.serve_cmds import add_abstain_args
from dundi.data.specs import DATASETS, SPLITS
from dundi.distributed import TRAIN_MAX_FAILURES
from dundi.nets.names import ARCHITECTURES
from dundi.robustness.verifiers import DEFAULT_VERIFIER, VERIFIERS
from dundi.rule.abstain_store import CALIBRATION_LIMIT, FALSE_ABSTAIN_RATE
from dundi.rule.params import METRICS, ORACLES_PER_CLASS
from dundi.run.names import ORACLE_KINDS, ORACLE_SEED
from dundi.serving.settings import ANSWER_FORMATS
from dundi.training.config import ADV_LOSSES, ADV_TARGETS, CERT_HEADS, LOSSES, MINING, TrainConfig

HANDLERS = "dundi.cli.pipeline_handlers"
DATA_HANDLERS = "dundi.cli.data_handlers"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="dataset cache (default: $DUNDI_DATA_DIR, else the user cache dir)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object, last")


def _add_train_args(p: argparse.ArgumentParser, native: bool) -> None:
    d = TrainConfig()  # the defaults shown are the config's own
    p.add_argument("--dataset", default=d.dataset, choices=tuple(DATASETS), help="dataset to train on")
    p.add_argument("--model", "--backbone", dest="arch", default=d.arch, choices=ARCHITECTURES,
                   help="lenet1 | lenet4 | lenet5 | vgg16 | cnn-ibp | cnn-ibp-medium | cnn7 | feinman-cnn (the "
                        "DNN module; the cnn-ibp ones are built for --certified; feinman-cnn is "
                        "Feinman et al.'s MNIST network, the source of `dundi transfer`)")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="passes over the training data")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="images (native) or tuples (triplet) per step")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, tuples and splits")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use only the first N training samples (default: all)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the training split held out for per-epoch validation, in [0, 0.5)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<dataset>-<model>-<kind>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they only show on a terminal)")
    p.add_argument("--device", default="auto", type=device_name,
                   help="where a training in this process runs: auto (a CUDA GPU when PyTorch sees one, "
                        "else the CPU), cpu, cuda or cuda:N (default %(default)s; Ray workers: --gpu)")
    if not native:
        _add_triplet_args(p, d)
    _add_certified_args(p, d, native)
    _add_adversarial_args(p, d)
    _add_ray_args(p)
    _add_common(p)


def _add_triplet_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    p.add_argument("--pretrained", default=None,
                   help="native run whose frozen backbone makes DunDi_P (default: none, DunDi_R)")
    p.add_argument("--tuples", type=positive_int, default=d.tuples, help="size of the tuple set (paper: 360000)")
    p.add_argument("--loss", default=d.loss, choices=LOSSES, help="sigmoid (paper) | margin")
    p.add_argument("--margin", type=positive_float, default=d.margin, help="margin of the margin loss")
    p.add_argument("--mining", default=d.mining, choices=MINING, help="random (paper) | batch-hard")
    p.add_argument("--embed-dim", type=positive_int, default=d.embed_dim, help="embedding dimensions")
    p.add_argument("--paper-loop", action="store_true",
                   help="three forward passes per tuple, as in the paper (slower, same loss)")
    p.add_argument("--oracles", type=positive_int, default=ORACLES_PER_CLASS,
                   help="oracles per class in the final index (default %(default)s)")
    hold = p.add_mutually_exclusive_group()
    hold.add_argument("--holdout-classes", type=nonnegative_int, nargs="+", default=None, metavar="CLASS",
                      help="dataset class indices left out of training, to enroll later with "
                           "`dundi index add` (default: none)")
    hold.add_argument("--holdout-random", type=positive_int, default=None, metavar="N",
                      help="leave out N dataset classes chosen with --seed (default: none)")
    p.add_argument("--metric", default=None, choices=METRICS,
                   help="distance of the two-step rule: euclidean (paper; default) | sqeuclidean "
                        "(certifiable; the default with --certified)")


def _add_certified_args(p: argparse.ArgumentParser, d: TrainConfig, native: bool) -> None:
    cert = p.add_argument_group("certified training (interval bounds through the network; "
                                "docs/certification.md)")
    cert.add_argument("--certified", action="store_true",
                      help=("train the softmax IBP baseline (Gowal et al. 2018: elided last layer, the "
                            "same batches and schedule as certified DunDi) that `dundi certify` can prove"
                            if native else "train so that `dundi certify` can prove answers robust "
                            "(sets --metric sqeuclidean)"))
    cert.add_argument("--cert-eps", type=unit_float, default=d.cert_eps,
                      help="L-inf budget of the worst-case loss (default %(default)s)")
    cert.add_argument("--cert-mix", type=fraction, default=d.cert_mix,
                      help="final weight of the worst-case loss (default %(default)s)")
    cert.add_argument("--cert-warmup", type=nonnegative_float, default=d.cert_warmup,
                      help="clean epochs before the budget grows (default %(default)s)")
    cert.add_argument("--cert-ramp", type=nonnegative_float, default=d.cert_ramp,
                      help="epochs over which eps and mix grow to their final values (default %(default)s)")
    cert.add_argument("--cert-per-class", type=positive_int, default=d.cert_per_class,
                      help="images of each class per batch (default %(default)s)")
    if not native:
        cert.add_argument("--cert-head", default=d.cert_head, choices=CERT_HEADS,
                          help="what the head is trained against: batch (each class's other images in "
                               "the batch, the default) | prototypes (learned class prototypes, which "
                               "then serve as the run's oracles: `dundi index build --oracle-kind`)")


def _add_adversarial_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    adv = p.add_argument_group("adversarial training (DunDi-AT for `train`, Madry-style PGD for `train-native`)")
    adv.add_argument("--adversarial", action="store_true", help="train on PGD examples crafted against the current model")
    adv.add_argument("--adv-eps", type=unit_float, default=d.adv_eps, help="L-inf budget (default %(default)s)")
    adv.add_argument("--adv-steps", type=positive_int, default=d.adv_steps, help="PGD iterations")
    adv.add_argument("--adv-alpha", type=positive_float, default=None, help="PGD step (default: 2.5*eps/steps)")
    adv.add_argument("--adv-target", default=d.adv_target, choices=ADV_TARGETS,
                     help="DunDi-AT's PGD objective: classes (leave the anchor's class for the nearest "
                          "other, default) | tuple (maximise the tuple's triplet loss)")
    adv.add_argument("--adv-loss", default=d.adv_loss, choices=ADV_LOSSES,
                     help="DunDi-AT's loss on adversarial anchors (classes target): prototype (softmax "
                          "over the batch's class prototypes, default) | triplet (hardest negative, TLA)")
    adv.add_argument("--adv-warmup", type=nonnegative_int, default=d.adv_warmup,
                     help="epochs over which eps ramps linearly up to --adv-eps (default %(default)s)")
    adv.add_argument("--adv-mix", type=fraction, default=d.adv_mix,
                     help="weight of the adversarial loss; 1.0 trains on adversarial examples only")


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    ray = p.add_argument_group("Ray Train (omit --workers to train in this process)")
    ray.add_argument("--workers", type=nonnegative_int, default=0,
                     help="train with Ray Train on W workers; 0 trains in this process")
    ray.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    ray.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ray.add_argument("--storage", default=None,
                     help="checkpoint storage path or URI (s3://, gs://, ...) (default: <out>/../ray_storage)")
    ray.add_argument("--name", default=None,
                     help="run name; the same name resumes from its last checkpoint "
                          "(default: the run directory's name)")
    ray.add_argument("--max-failures", type=nonnegative_int, default=TRAIN_MAX_FAILURES,
                     help="worker failures Ray Train recovers from before giving up")


def device_name(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N (checked before torch is imported)."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")


def _add_rule_args(p: argparse.ArgumentParser) -> None:
    """The two-step rule's n, m, k and the evaluated split: shared by classify and certify."""
    add_two_step_args(p)
    p.add_argument("--split", default="test", choices=SPLITS, help="dataset split (default %(default)s)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N images of the split (default: all)")


def _register_index(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="oracle index").add_subparsers(
        dest="index_cmd", metavar="ACTION", required=True)
    p = index.add_parser("build", help="embed n oracles per class into a FAISS index in the run")
    p.add_argument("run", help="DunDi run directory")
    p.add_argument("--oracles", type=positive_int, default=ORACLES_PER_CLASS,
                   help="oracles per class (n) (default %(default)s)")
    p.add_argument("--seed", type=int, default=ORACLE_SEED, help="seed of the oracle choice")
    p.add_argument("--select-eps", type=unit_float, default=None, metavar="EPS",
                   help="certified runs: choose the oracles for certified margin at this L-inf "
                        "budget instead of at random (docs/certification.md; default: random, or, with "
                        "--oracle-kind images, herded toward a prototype run's learned prototypes)")
    p.add_argument("--oracle-kind", choices=ORACLE_KINDS, default=None,
                   help="images: n training images per class; prototypes: a --cert-head prototypes "
                        "run's learned prototypes themselves (two vectors per class, --oracles ignored), "
                        "so the rule ranks exactly as the network was trained (default: prototypes for "
                        "such a run, else images)")
    _add_common(p)
    p.set_defaults(handler=handler(HANDLERS, "cmd_index_build"))
    p = index.add_parser("calibrate", help="calibrate the abstain rule `dundi serve` uses by default")
    p.add_argument("run", help="DunDi run directory with an oracle index")
    p.add_argument("--false-abstain", type=open_fraction, default=FALSE_ABSTAIN_RATE,
                   help="share of clean held-out images that may abstain (default %(default)s)")
    p.add_argument("--limit", type=positive_int, default=CALIBRATION_LIMIT,
                   help="held-out images to calibrate on (default %(default)s)")
    add_two_step_args(p)  # the rule as it will be served
    _add_common(p)
    p.set_defaults(handler=handler(HANDLERS, "cmd_index_calibrate"))
    register_index_changes(index, _add_common)


def _register_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify image files (one answer each), or a split's accuracy")
    p.add_argument("run", help="run directory (DunDi: two-step rule; native: argmax of the logits)")
    p.add_argument("images", nargs="*", metavar="IMAGES",
                   help="PNG/JPEG files, folders or glob patterns to classify (default: none, which "
                        "measures accuracy on --split instead)")
    _add_rule_args(p)
    p.add_argument("--radius", action="store_true",
                   help="also each answer's certified L-inf radius (certified runs; see `dundi certify`)")
    files = p.add_argument_group("with IMAGES")
    files.add_argument("--format", default="table", choices=ANSWER_FORMATS,
                       help="table (aligned, default) | jsonl | csv | parquet (needs --out)")
    files.add_argument("--out", default=None, help="write the answers to this file, atomically (default: stdout)")
    files.add_argument("--resize", action="store_true",
                       help="scale images of another size to the run's input size (default: refuse them)")
    add_abstain_args(files)
    _add_common(p)
    p.set_defaults(handler=handler(HANDLERS, "cmd_classify"))


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="fetch and list datasets").add_subparsers(
        dest="data_cmd", metavar="ACTION", required=True)
    p = data.add_parser("fetch", help="materialise a dataset as Parquet shards in the cache")
    p.add_argument("dataset", choices=tuple(DATASETS), help="mnist | mnist-10k | fashion-mnist | cifar10")
    p.add_argument("--source-dir", default=None,
                   help="directory holding the dataset's standard files (default: $DUNDI_SOURCE_DIR, "
                        "else the standard download sources)")
    _add_common(p)
    p.set_defaults(handler=handler(DATA_HANDLERS, "cmd_data_fetch"))
    p = data.add_parser("info", help="list cached datasets")
    _add_common(p)
    p.set_defaults(handler=handler(DATA_HANDLERS, "cmd_data_info"))

    p = sub.add_parser("train-native", help="train a native softmax model (LeNet-1/4/5, VGG-16)")
    _add_train_args(p, native=True)
    p.set_defaults(handler=handler(HANDLERS, "cmd_train_native"))

    p = sub.add_parser("train", help="triplet-train a Distance NN (DunDi_R, or DunDi_P with --pretrained)")
    _add_train_args(p, native=False)
    p.set_defaults(handler=handler(HANDLERS, "cmd_train"))

    _register_index(sub)
    _register_classify(sub)

    p = sub.add_parser("certify", help="certified accuracy of a run's two-step rule in L-inf balls")
    p.add_argument("run", help="certified DunDi run directory (dundi train --certified)")
    p.add_argument("--eps", type=unit_float, nargs="+", default=[0.1, 0.2, 0.3],
                   help="L-inf radii on [0, 1] pixels (default %(default)s)")
    p.add_argument("--verifier", default=DEFAULT_VERIFIER, choices=VERIFIERS,
                   help="interval: interval bounds, the last layer exact (default); linear: also backward "
                        "linear bounds through the whole network, the tighter per condition (slower)")
    _add_rule_args(p)
    _add_common(p)
    p.set_defaults(handler=handler(HANDLERS, "cmd_certify"))

    p = sub.add_parser("export", help="write a DunDi run as a TorchScript nn.Module any attack tool can load")
    p.add_argument("run", help="DunDi run directory with an oracle index")
    p.add_argument("--out", required=True, help="file to write (TorchScript; load with torch.jit.load)")
    add_two_step_args(p)
    p.add_argument("--json", action="store_true", help="print the file's metadata as one JSON object, last")
    p.set_defaults(handler=handler(HANDLERS, "cmd_export"))

    p = sub.add_parser("demo", help="the whole path on mnist-10k in minutes: Table 1 of the paper")
    p.add_argument("--out", default=os.environ.get("DUNDI_DEMO_OUT", "runs/demo"),
                   help="directory of the demo's runs and table (default: $DUNDI_DEMO_OUT, else runs/demo)")
    p.add_argument("--quick", action="store_true", help="a smaller budget (CI smoke run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they only show on a terminal)")
    _add_common(p)
    p.set_defaults(handler=handler(HANDLERS, "cmd_demo"))
