"""`fl-sim attack`: one round of the attack without Flower, on victims drawn from a data set.

Each victim trains locally on its own images with the real client code (clients/training.py) and
applies the --defense as a client of `fl-sim run` would (clients/defenses.py), the engine inverts the
weight changes, and the evaluation path scores them against the truth. With `secagg` the engine gets
only the victims' mean update, attacked as one victim holding all their images.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from attacker import invert, resolve_device
from clients.defenses import defense_seed, sent_weights
from clients.training import local_train

from . import config
from .data import load_dataset
from .evaluation import score_and_save, summarise
from .models import build_model
from .outputs import rewrite_jsonl, write_json
from .updates import mean_update, parameter_names, update_norm, weight_change, weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_task_arguments(parser)
    parser.add_argument("--num-victims", type=int, default=8, help="victims (clients) to attack")
    parser.add_argument("--victims-at-once", type=int, default=None,
                        help="cap on victims optimised together (default all; 1 = one at a time, as other tools do)")


def check(args) -> None:
    config.check_task_arguments(args)
    if args.attack == "none":
        raise config.ConfigError("fl-sim attack needs an attack: choose one of dlg, idlg, ig")
    if args.num_victims < 1:
        raise config.ConfigError(f"--num-victims must be at least 1, got {args.num_victims}")
    if args.victims_at_once is not None and args.victims_at_once < 1:
        raise config.ConfigError(f"--victims-at-once must be at least 1, got {args.victims_at_once}")


def victim_indices(dataset_size: int, victims: int, per_victim: int, seed: int) -> np.ndarray:
    """Distinct examples for every victim, drawn from the seed: (victims, per_victim)."""
    if victims * per_victim > dataset_size:
        raise config.ConfigError(
            f"{victims} victims x {per_victim} images need {victims * per_victim} examples; the data set has {dataset_size}")
    rng = np.random.default_rng(seed)
    return rng.choice(dataset_size, size=victims * per_victim, replace=False).reshape(victims, per_victim)


def run(args) -> dict:
    started = time.perf_counter()
    check(args)
    settings = config.training_settings(args)
    defense = config.defense(args)
    attack = config.attack_config(args)
    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset, args.data_root, train=True)
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    model = build_model(args.model, *shape[:2], dataset.num_classes, init=args.init, seed=args.seed)
    global_weights = weights(model)
    parameters = parameter_names(model)
    indices = victim_indices(len(dataset), args.num_victims, settings.num_images, args.seed)
    updates, truth = [], []
    for victim, examples in enumerate(indices):
        images, labels = dataset.tensors(examples)
        client = build_model(args.model, *shape[:2], dataset.num_classes, init="default")
        client.load_state_dict(global_weights)
        local_train(client, images, labels, settings)
        sent = sent_weights(defense, global_weights, weights(client), parameters, defense_seed(args.seed, victim))
        updates.append(weight_change(global_weights, sent))
        truth.append((images, labels))
    seen = settings
    if defense.secure_aggregation:  # the server learns only the mean update: one victim with every image
        updates = [mean_update(updates)]
        truth = [(torch.cat([images for images, _ in truth]), torch.cat([labels for _, labels in truth]))]
        seen = settings.for_mean_of(args.num_victims)
    assumed = seen.as_single_gradient() if args.no_replay else seen
    attack_started = time.perf_counter()
    results = invert(model, global_weights, updates, assumed, attack, image_shape=shape,
                     num_classes=dataset.num_classes, iterations=args.iterations, seed=args.seed,
                     device=device, progress=True,
                     max_rows=args.victims_at_once and args.victims_at_once * attack.restarts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    attack_seconds = time.perf_counter() - attack_started
    out = Path(args.out)
    rows = []
    for victim, (result, (images, labels)) in enumerate(zip(results, truth)):
        row = {"victim": victim, **score_and_save(result, images, labels, out / f"victim-{victim:03d}"),
               "update_norm": update_norm(updates[victim], parameters)}
        rows.append(row)
    rewrite_jsonl(out / "metrics.jsonl", rows)
    summary = {
        **summarise(rows),
        "update_norm_median": float(np.median([row["update_norm"] for row in rows])),
        "iterations": args.iterations,
        "attack_seconds": attack_seconds,
        "seconds": time.perf_counter() - started,
        "attack": attack.name, "model": args.model, "init": args.init, "dataset": args.dataset,
        "batch_size": settings.batch_size, "local_steps": settings.local_steps, "epochs": settings.epochs,
        "lr": settings.lr, "momentum": settings.momentum, "batchnorm": str(settings.batchnorm), "defense": args.defense,
        "replay": not args.no_replay,
        "restarts": attack.restarts, "seed": args.seed, "device": str(device),
        "victims_at_once": args.victims_at_once or args.num_victims,
    }
    write_json(out / "summary.json", summary)
    return summary


def main(args) -> int:
    summary = run(args)
    print(f"attack {summary['attack']}: {summary['victims']} victims, PSNR median {_fmt(summary['psnr_median'])} dB "
          f"(min {_fmt(summary['psnr_min'])}), labels {_fmt(summary['label_acc'], '.0%')}, "
          f"attack {summary['attack_seconds']:.1f} s -> {args.out}")
    return 0


def _fmt(value, spec=".1f"):
    return "n/a" if value is None else format(value, spec)
