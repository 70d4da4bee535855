"""Trains the disguised attack's model and secret decoder together (attacker/disguise.py) and writes the checkpoint
`--attack disguise --disguise-checkpoint` loads (the model's and decoder's states; its config as JSON beside it).

Each step simulates one FedSGD round of --clients clients x --batch-size images drawn from the training split
(horizontal flips at random), minus the shards of the --holdout-clients clients of an fl-sim run with the seeds of
--holdout-seeds (so those clients' images are never trained on), and takes one Adam step on the joint loss: the
model's classification, the property units' calibration, the decoder on every image, the decoder on what the
units' mean gradient gives (backpropagated through the gradient into the model), and the classification after the
round's own FedSGD step at --lr (--stable: so the federation can go on training the model it is sent). Secure
aggregation's rounding is simulated as Gaussian noise on the mean gradient (--noise; by default that of Flower's
SecAgg+ at its clipping range 8 and 2^22 levels, over --clients clients, at the clients' --lr).

It stops after --minutes of wall time or --steps steps, whichever comes first, and writes a snapshot at each of
--snapshots minutes (OUT with the minutes in its name) for the curve of PSNR against training time. The checkpoint
it writes at the end has the units' rows fitted to their thresholds on the training images (--fit-ridge) and the
layer's dead rows revived (--revive; docs/attacks.md has the recipe measured, in three stages).

    OMP_NUM_THREADS=1 python benchmarks/disguise_train.py --model cnn --minutes 50 --out out/disguise/cnn.pt
    # on a GPU: --device cuda (the same steps in a fraction of the time)
"""
import copy
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import common
import numpy as np
import torch

from attacker.disguise import (
    PROPERTIES,
    Decoder,
    DisguiseConfig,
    fit_units,
    property_scores,
    revive_rows,
    train_step,
)
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.models import build_model
from fl_sim.learning.partition import client_shards
from fl_sim.server.disguise import LAYERS, feature_shape, load_checkpoint, save_checkpoint

SECAGG_CLIPPING, SECAGG_LEVELS = 8.0, 2 ** 22  # Flower's SecAgg+ defaults as fl-sim runs them


def secagg_noise(clients: int, lr: float) -> float:
    """The standard deviation, in gradient units, of SecAgg+'s stochastic rounding of the mean update of `clients`
    clients (each entry's rounding error at most one level, variance at most level^2 / 4)."""
    level = 2 * SECAGG_CLIPPING / SECAGG_LEVELS
    return level / 2 / math.sqrt(clients) / lr


def holdout(labels: np.ndarray, clients: int, seeds: list[int]) -> set[int]:
    """The training-split indices held by the clients of fl-sim runs of `clients` clients and these seeds."""
    config = RunConfig()
    held: set[int] = set()
    for seed in seeds:
        for shard in client_shards(labels, clients, config.partition, config.alpha, seed, config.min_shard,
                                   config.max_shard):
            held.update(int(i) for i in shard)
    return held


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--model", default="cnn", choices=sorted(LAYERS))
    parser.add_argument("--property", default="bright", choices=PROPERTIES)
    parser.add_argument("--units", type=int, default=24, help="units of the layer that disaggregate")
    parser.add_argument("--least", type=float, default=0.05, help="images of a round expected above the top unit")
    parser.add_argument("--most", type=float, default=20.0, help="images of a round expected above the lowest unit")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05, help="the clients' learning rate the readout assumes")
    parser.add_argument("--noise", type=float, help="aggregation noise in gradient units (default: SecAgg+'s)")
    parser.add_argument("--train-lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--width", type=int, default=64, help="the decoder's width")
    parser.add_argument("--weights", default="1,10,1,1",
                        help="weights of the classification, calibration, auto-encoding and attack losses")
    parser.add_argument("--init", help="start from this checkpoint's model and decoder (trained for the same units)")
    parser.add_argument("--stable", type=float, default=1.0,
                        help="weight of the loss after the round's own FedSGD step at --lr (0: off)")
    parser.add_argument("--fit-ridge", type=float, default=10.0,
                        help="at the end, fit the units' rows again to their thresholds on the training images "
                             "(shifted and mirrored), with this ridge (attacker/disguise.py `fit_units`; 0: off)")
    parser.add_argument("--revive", type=float, default=0.05,
                        help="at the end, make the layer's rows that fire for fewer than this share of the training "
                             "images fire for almost all (attacker/disguise.py `revive_rows`; 0: off)")
    parser.add_argument("--minutes", type=float, default=50.0)
    parser.add_argument("--steps", type=int, default=10 ** 9)
    parser.add_argument("--snapshots", default="", help="minutes at which to write a snapshot, e.g. 10,20,40")
    parser.add_argument("--holdout-clients", type=int, default=10)
    parser.add_argument("--holdout-seeds", default="0,1,2")
    parser.add_argument("--out", required=True)
    common.add_data_root(parser)
    common.add_seed(parser)
    common.add_device(parser)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    train = cached_dataset("cifar10", args.data_root, True)
    (channels, size, _), classes = image_spec(train)
    held = holdout(train.labels, args.holdout_clients, [int(s) for s in args.holdout_seeds.split(",") if s])
    pool = np.array([i for i in range(len(train)) if i not in held])
    images_all, labels_all = train.tensors(pool)
    round_images = args.clients * args.batch_size
    if len(pool) < round_images:
        print(f"error: {len(pool)} training images left, fewer than a round's {round_images}", file=sys.stderr)
        sys.exit(2)
    model = build_model(args.model, channels, size, classes, seed=args.seed)
    scores = property_scores(images_all, args.property)
    expected = np.geomspace(args.most, args.least, args.units)  # thresholds ascending
    thresholds = [float(torch.quantile(scores, 1 - m / round_images)) for m in expected]
    layer = LAYERS[args.model][0]
    dense = model.get_submodule(layer)
    assert isinstance(dense, torch.nn.Linear), f"{layer} of {args.model} is not a linear layer"
    width = dense.out_features
    units = [int(u) for u in torch.randperm(width, generator=torch.Generator().manual_seed(args.seed))[:args.units]]
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    noise = secagg_noise(args.clients, args.lr) if args.noise is None else args.noise
    config = DisguiseConfig(args.model, args.property, layer, units, [float(m) for m in expected], thresholds,
                            list(feature_shape(model, args.model, (channels, size, size))), [channels, size, size],
                            round_images, args.clients if has_bn else 1, args.batch_size, args.lr, noise, 0,
                            args.seed, args.width)
    decoder = Decoder(config.feature_shape, config.image_shape, args.width)
    if args.init:  # the model, decoder and units of an earlier checkpoint; its thresholds are this run's too
        state, decoder, earlier = load_checkpoint(args.init, args.model, config.image_shape)
        model.load_state_dict(state)
        config = replace(config, units=earlier.units, expected=earlier.expected, thresholds=earlier.thresholds,
                         width=earlier.width, steps=earlier.steps, history=list(earlier.history))
    given = [float(w) for w in args.weights.split(",")]
    if len(given) != 4:
        parser.error(f"--weights takes 4 numbers, not {args.weights!r}")
    weights = (given[0], given[1], given[2], given[3])
    model.to(device).train()
    decoder.to(device).train()
    optimizer = torch.optim.Adam([*model.parameters(), *decoder.parameters()], lr=args.train_lr)
    generator = torch.Generator().manual_seed(args.seed)
    images_all, labels_all = images_all.to(device), labels_all.to(device)
    snapshots = sorted(float(m) for m in args.snapshots.split(",") if m)
    started = time.perf_counter()
    window: list = []
    step = 0
    history = list(config.history)  # an --init checkpoint's own, then this run's (steps and minutes go on from it)
    earlier_minutes = history[-1]["minutes"] if history else 0.0
    while step < args.steps and (elapsed := (time.perf_counter() - started) / 60) < args.minutes:
        pick = torch.randperm(len(pool), generator=generator)[:round_images].to(device)
        images, labels = images_all[pick], labels_all[pick]
        flip = torch.rand(len(images), generator=generator).to(device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        loss, parts = train_step(model, decoder, config, images, labels, weights, generator=generator,
                                 stable=args.stable)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        window.append(parts)
        if step % 50 == 0:
            mean = {key: float(np.nanmean([getattr(p, key) for p in window])) for key in vars(window[0])}
            history.append({"step": config.steps + step, "minutes": round(earlier_minutes + elapsed, 2),
                            **{k: round(v, 5) for k, v in mean.items()}})
            print(f"step {step} ({elapsed:.1f} min): " + ", ".join(f"{k} {v:.4g}" for k, v in mean.items())
                  + f", attack PSNR ~{-10 * math.log10(max(mean['attack'], 1e-10)):.1f} dB", flush=True)
            window = []
        while snapshots and elapsed >= snapshots[0]:
            minutes = snapshots.pop(0)
            out = Path(args.out)
            write(out.with_name(f"{out.stem}-{minutes:g}min{out.suffix}"), model, decoder, config, step, history)
    if args.fit_ridge > 0:
        model = model.cpu().eval()
        weight, bias = fit_units(model, config, images_all.cpu(), args.fit_ridge)
        model.load_state_dict({f"{config.layer}.weight": weight, f"{config.layer}.bias": bias}, strict=False)
        print(f"fitted the {len(config.units)} units' rows on {len(images_all)} images, shifted and mirrored",
              flush=True)
    if args.revive > 0:
        model = model.cpu().eval()
        changed = revive_rows(model, config, images_all.cpu(), args.revive)
        name = f"{config.layer}.weight"
        count = int((changed[name] != model.state_dict()[name]).any(1).sum()) if changed else 0
        model.load_state_dict(changed, strict=False)
        print(f"revived {count} rows of {config.layer} that fired for under {args.revive:.0%} of the training images",
              flush=True)
    write(Path(args.out), model, decoder, config, step, history)
    print(f"{step} steps in {(time.perf_counter() - started) / 60:.1f} min: {args.out}")


def write(path: Path, model, decoder, config: DisguiseConfig, step: int, history: list) -> None:
    """The checkpoint as it is now (copies on the CPU; training goes on where it was)."""
    save_checkpoint(path, copy.deepcopy(model).cpu(), copy.deepcopy(decoder).cpu(),
                    replace(config, steps=config.steps + step, history=list(history)))
    print(f"wrote {path} at step {step}", flush=True)


if __name__ == "__main__":
    main()
