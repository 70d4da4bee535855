"""`fl-sim pretrain`: a model trained centrally for a few epochs, saved as a state dict for `--init ckpt.pt`.

Lets a sweep ask how much a trained model leaks, compared with the untrained one of round 1.
"""
import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attacker import resolve_device
from fl_sim.commands import guard
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.data import DATASETS, load_dataset
from fl_sim.learning.models import MODELS, build_model
from fl_sim.results.outputs import atomic_write_bytes, write_json
from fl_sim.results.preflight import check_writable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mnist", help=f"one of {', '.join(DATASETS)} (default mnist)")
    parser.add_argument("--data-root", default=None, help="folder holding the data (default $FL_SIM_DATA, else ./data)")
    parser.add_argument("--model", default="lenet", help=f"one of {', '.join(MODELS)} (default lenet)")
    parser.add_argument("--init", default="default", help="starting weights: 'default', 'paper' or a checkpoint")
    parser.add_argument("--epochs", type=float, default=1,
                        help="passes over the training examples (fractions allowed: 0.1 = a tenth of one)")
    parser.add_argument("--train-examples", type=int, default=None, help="use only this many training examples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam learning rate (Adam: sigmoid LeNet barely moves under plain SGD)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="checkpoint file to write, e.g. ckpt.pt")


def check(args) -> None:
    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}: choose one of {', '.join(DATASETS)}")
    if args.model not in MODELS:
        raise ConfigError(f"unknown model {args.model!r}: choose one of {', '.join(MODELS)}")
    if not args.epochs > 0:
        raise ConfigError(f"--epochs must be positive, got {args.epochs}")
    if args.batch_size < 1 or (args.train_examples is not None and args.train_examples < 1):
        raise ConfigError("--batch-size and --train-examples must be at least 1")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    if args.init not in ("default", "paper") and not Path(args.init).is_file():
        raise ConfigError(f"--init {args.init!r} is neither 'default', 'paper' nor an existing checkpoint file")
    out = Path(args.out)
    for path in (out, Path(f"{out}.json")):  # never replace a file it did not write (or one it did: say so)
        if path.is_dir():
            raise ConfigError(f"--out {str(out)!r}: {str(path)!r} is a folder; give the checkpoint's file name, "
                              "e.g. ckpt.pt")
        if path.exists() or path.is_symlink():
            raise ConfigError(f"--out {str(out)!r}: {str(path)!r} exists already; choose a new name, or delete it "
                              "first to replace it")
    guard.check_outside_data(out, args.data_root)
    guard.check_device(args.device)
    check_writable(out.parent)


def pretrain(args) -> dict:
    """Trains, writes the checkpoint and OUT.json beside it; returns the test accuracy and what was done."""
    check(args)
    started = time.perf_counter()
    device = resolve_device(args.device)
    train, test = load_dataset(args.dataset, args.data_root, train=True), load_dataset(args.dataset, args.data_root,
                                                                                        train=False)
    model = build_model(args.model, train.channels, train.image_size, train.num_classes, init=args.init,
                        seed=args.seed).to(device)
    rng = np.random.default_rng(args.seed)
    pool = rng.permutation(len(train))[:args.train_examples]
    steps = max(1, round(args.epochs * len(pool) / args.batch_size))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    order = np.concatenate([rng.permutation(pool) for _ in range(int(np.ceil(args.epochs)) + 1)])
    for step in range(steps):
        images, labels = train.tensors(order[step * args.batch_size:(step + 1) * args.batch_size])
        optimizer.zero_grad()
        F.cross_entropy(model(images.to(device)), labels.to(device)).backward()
        optimizer.step()
    result = {"test_accuracy": accuracy(model, test, device), "steps": steps, "train_examples": len(pool),
              "epochs": args.epochs, "dataset": args.dataset, "model": args.model, "seed": args.seed,
              "seconds": time.perf_counter() - started}
    buffer = io.BytesIO()
    torch.save({name: tensor.cpu() for name, tensor in model.state_dict().items()}, buffer)
    atomic_write_bytes(args.out, buffer.getvalue())
    write_json(str(args.out) + ".json", result)
    return result


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset, device, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        images, labels = dataset.tensors(np.arange(start, min(start + batch_size, len(dataset))))
        correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
    return correct / len(dataset)


def main(args) -> int:
    result = pretrain(args)
    print(f"fl-sim pretrain: {args.model} on {result['train_examples']} {args.dataset} examples, {result['steps']} "
          f"steps ({result['epochs']} epoch(s)), test accuracy {result['test_accuracy']:.2%}, "
          f"{result['seconds']:.1f} s -> {args.out}")
    return 0
