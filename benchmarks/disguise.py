"""The disguised attack (`--attack disguise`) measured on held-out CIFAR-10: what it reads from the secure aggregate
of 10 clients x B = 16, what every client detector scores on the model it sends, and what the federation learns.

Two simulations, no Flower (fl-sim run --defense secagg gives the same figures through Flower's SecAgg+; see
docs/attacks.md):

- The aggregate alone: --sim-rounds rounds a seed, each of --clients x --batch-size images drawn from the test
  split (never trained on by the server), the checkpoint's model, the units' mean gradient over the clients
  (each client one step on its own batch) with SecAgg+'s rounding as Gaussian noise (its training's level),
  read by the decoder (--match: then matched to the features read, as the attack does) and scored against the
  round's image with the property (PSNR, SSIM). `oracle` is the decoder on that image's own features: the
  reconstructor's ceiling.
- A FedSGD federation (fl-sim run's clients: 10 clients holding the shards fl-sim run deals with each seed, never
  trained on by the server; one step of B = 16 a round, lr and momentum as fl-sim run) for --rounds rounds a seed,
  started from the checkpoint (the attack's first round) and, beside it, an honest one started from the model's
  own initialisation. Every client-round of the disguised federation runs every registered detector
  (clients/detectors/; their honest rates: benchmarks/detectors.py) on the model it is sent and its own batch,
  against the registered thresholds (the inspection against the last model that client passed); every round's
  aggregate is read as above; the test accuracy of the checkpoint as sent and of both federations' last models.
  What the server does between rounds is asked for: --slow 0.01 is what fl-sim run's attack does (only 1% of
  each round's step taken on the convolutions and the units' rows, fl_sim/server/disguise.py `backbone_slowed`);
  --fit-units (the units' rows fitted again on the test split's images before a later round is sent) with --refit
  (the decoder refit to the sent model) is the alternative that trains the whole model at the full rate.

    OMP_NUM_THREADS=1 python benchmarks/disguise.py --checkpoint out/disguise/cnn.pt --slow 0.01 --match 200 \
        --json docs/data/disguise.json
    # or one process a seed, then: python benchmarks/disguise.py --merge S0.json S1.json S2.json --json OUT.json
"""
import argparse
import copy
import json
import time
from collections import defaultdict
from pathlib import Path

import common
import numpy as np
import torch

from attacker.disguise import (
    Decoder,
    DisguiseConfig,
    decode_round,
    fit_units,
    layer_inputs_of,
    property_scores,
    refit_decoder,
    unit_gradients,
)
from clients.detectors import Sent, run_detector
from clients.training import local_train
from fl_sim.contract.detectors import INSPECT, detector_specs
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.models import build_model
from fl_sim.learning.partition import client_shards, training_examples
from fl_sim.learning.updates import Weights
from fl_sim.results.gallery import client_folder
from fl_sim.results.metrics import psnr, ssim
from fl_sim.results.outputs import read_jsonl
from fl_sim.server.disguise import backbone_slowed, load_checkpoint


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--checkpoint")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge runs written with --json into --json")
    parser.add_argument("--flower", nargs="+", metavar="OUT", default=[],
                        help="with --merge: fl-sim run output folders of the attack (--defense secagg) and honest runs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sim-rounds", type=int, default=100, help="aggregate-only rounds a seed")
    parser.add_argument("--rounds", type=int, default=10, help="federation rounds a seed (0: the simulation alone)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05, help="the federation's client learning rate (fl-sim run's)")
    parser.add_argument("--refit", type=int, default=0,
                        help="each round after the first, refit the decoder to the global model's features on the "
                             "test split's images (the server's public images) for this many steps (0: off)")
    parser.add_argument("--fit-units", action="store_true",
                        help="each round after the first, fit the units' rows again to their thresholds on the test "
                             "split's images (attacker/disguise.py `fit_units`) before the model is sent")
    parser.add_argument("--slow", type=float, default=None, metavar="RATE",
                        help="each round, the server takes RATE of the round's step on the convolutions and the units' "
                             "rows (fl_sim/server/disguise.py `backbone_slowed`; default: the whole step)")
    parser.add_argument("--match", type=int, default=0,
                        help="refine each read by this many steps matching its layer input (`match_features`; 0: off)")
    parser.add_argument("--json", help="write the figures here")
    common.add_data_root(parser)
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.json, args.flower)
        return
    if not args.checkpoint:
        parser.error("--checkpoint is needed (or --merge)")
    torch.set_num_threads(1)
    started = time.perf_counter()
    train = cached_dataset("cifar10", args.data_root, True)
    test = cached_dataset("cifar10", args.data_root, False)
    (channels, size, _), classes = image_spec(train)
    state, decoder, config = load_checkpoint(args.checkpoint, "cnn", (channels, size, size))
    seeds = [int(s) for s in args.seeds.split(",")]
    model = build_model(config.model, channels, size, classes)
    model.load_state_dict(state)
    sent_accuracy = test_accuracy(model, test)  # the checkpoint as it is sent, before any client trains it
    sim = aggregate_rounds(model, decoder, config, test, seeds, args)
    print(f"aggregate simulation ({len(sim['psnr'])} rounds): " + figures(sim), flush=True)
    result: dict = {"attack": "disguise", "model": config.model, "property": config.property,
                    "clients": args.clients, "batch_size": args.batch_size, "training_steps": config.steps,
                    "training_minutes": config.history[-1]["minutes"] if config.history else None,
                    "simulation": summary(sim)}
    if args.rounds == 0:  # the aggregate simulation alone
        print(f"test accuracy as sent {sent_accuracy:.1%}; {time.perf_counter() - started:.0f} s")
        return
    attack_scores: dict[str, list[float]] = defaultdict(list)
    federation: dict[str, list[float]] = defaultdict(list)
    accuracy: dict[str, list[float]] = defaultdict(list)
    moved: dict[str, list[float]] = defaultdict(list)
    for seed in seeds:
        for label, start in (("disguise", state), ("honest", None)):
            scores, reads, acc, least = federate(label, start, decoder, config, train, test, seed, args)
            accuracy[label].append(acc)
            moved[label].extend(least)
            for name, values in scores.items():
                attack_scores[name].extend(values)
            if label == "disguise":
                for key, values in reads.items():
                    federation[key].extend(values)
        print(f"seed {seed}: accuracy disguise {accuracy['disguise'][-1]:.1%}, honest {accuracy['honest'][-1]:.1%}",
              flush=True)
    print(f"federation reads ({len(federation['psnr'])} rounds): " + figures(federation))
    result["federation"] = summary(federation)
    result["detectors"] = {name: detector_figures(attack_scores[name], name) for name in attack_scores}
    result["accuracy"] = {"rounds": args.rounds, "lr": args.lr, "seeds": seeds, **{k: [round(v, 4) for v in vs]
                                                                     for k, vs in accuracy.items()},
                          "disguise_sent": round(sent_accuracy, 4)}
    result["least_moved"] = {label: {"median": float(np.median(values)), "min": float(np.min(values)),
                                     "max": float(np.max(values))} for label, values in moved.items()}
    result["values"] = {"simulation": dict(sim), "federation": dict(federation), "detectors": dict(attack_scores)}
    result["command"] = ("OMP_NUM_THREADS=1 python benchmarks/disguise.py --checkpoint CHECKPOINT "
                         f"--seeds {args.seeds} --sim-rounds {args.sim_rounds} --rounds {args.rounds} --lr {args.lr}"
                         + (f" --refit {args.refit}" if args.refit else "") + (" --fit-units" if args.fit_units else "")
                         + (f" --slow {args.slow:g}" if args.slow is not None else "")
                         + (f" --match {args.match}" if args.match else ""))
    for name, fig in result["detectors"].items():
        print(f"{name}: flagged {fig['flagged']}/{fig['client_rounds']} ({fig['flagged_share']:.1%}), median "
              f"{fig['median']:.4g}, max {fig['max']:.4g}, threshold {fig['threshold']:g}")
    print(f"accuracy after {args.rounds} rounds: disguise {accuracy['disguise']} (as sent: {sent_accuracy:.1%}), "
          f"honest {accuracy['honest']}")
    for label, fig in result["least_moved"].items():
        print(f"{label}: the least a conv or linear weight moved between the models sent in consecutive rounds, over "
              f"its norm: median {fig['median']:.3g}, min {fig['min']:.3g}, max {fig['max']:.3g}")
    print(f"{time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def strip(path: Path, count: int, side: int) -> torch.Tensor:
    """The `count` images of a strip fl-sim wrote (fl_sim/results/outputs.py `image_strip`, upscaled 2x)."""
    from PIL import Image
    pixels = np.asarray(Image.open(path).convert("RGB"))[::2, ::2]
    images = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)
    return torch.stack(images.split(side, dim=2)[:count])


def flower_runs(folders: list[str], property_name: str) -> dict:
    """The disguise's reads in fl-sim runs (--defense secagg): each round's decoded image (the one its metrics row
    marks unconfirmed, in the reconstruction strip) against the round's image with the property (truth strip), and
    the scoreboard's own figure (its best match among the round's images); each run's global accuracy per round."""
    reads: dict[str, list[float]] = defaultdict(list)
    accuracy = {}
    for folder in map(Path, folders):
        for row in read_jsonl(folder / "metrics.jsonl"):
            if row.get("client") != "aggregate" or row.get("status") != "ok":
                continue
            statuses = row["image_status"]
            count = len(statuses)
            place = next((i for i, state in enumerate(statuses) if state != "unrecovered"), None)
            images = folder / client_folder(row["round"], "aggregate") / "truth.png"
            truth = strip(images, count, 32)
            chosen = int(property_scores(truth, property_name).argmax())
            if place is None:
                reads["psnr"].append(0.0)
                continue
            decoded = strip(images.with_name("reconstruction.png"), count, 32)[place]
            reads["psnr"].append(psnr(decoded, truth[chosen]))
            reads["ssim"].append(ssim(decoded, truth[chosen]))
            reads["scoreboard_psnr"].append(psnr(decoded, truth[place]))  # its best match, as fl-sim scores it
        accuracy[folder.name] = [row["accuracy"] for row in read_jsonl(folder / "global.jsonl")]
    p = np.array(reads["psnr"])
    return {"rounds": len(p), "psnr_median": round(float(np.median(p)), 2), "psnr_worst": round(float(p.min()), 2),
            "share_20db": round(float((p >= 20).mean()), 3), "share_30db": round(float((p >= 30).mean()), 3),
            "ssim_median": round(float(np.median(reads["ssim"])), 3) if reads["ssim"] else None,
            "psnr_each": [round(v, 2) for v in p],
            "scoreboard_psnr_each": [round(v, 2) for v in reads["scoreboard_psnr"]], "accuracy_by_round": accuracy}


def merge(paths: list[str], out: str | None, flower: list[str]) -> None:
    """The figures of several runs of this benchmark (e.g. one a seed, run side by side) as one, from their values."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    values: dict[str, dict[str, list[float]]] = {part: defaultdict(list) for part in
                                                 ("simulation", "federation", "detectors")}
    first_round: dict[str, dict[str, list[float]]] = {part: defaultdict(list) for part in ("federation", "detectors")}
    for run in runs:
        run_seeds, rounds = len(run["accuracy"]["seeds"]), run["accuracy"]["rounds"]
        for part, found in run["values"].items():
            for key, listed in found.items():
                values[part][key].extend(listed)
                if part in first_round:  # round 1 of each seed: the checkpoint as sent (seed after seed, round
                    # after round, client after client)
                    each = len(listed) // run_seeds  # one seed's values: its rounds (x clients for the detectors)
                    step = 1 if part == "federation" else each // rounds
                    for seed in range(run_seeds):
                        first_round[part][key].extend(listed[seed * each:seed * each + step])
        THRESHOLDS.update({name: figures["threshold"] for name, figures in run["detectors"].items()})
    first = runs[0]
    seeds = [seed for run in runs for seed in run["accuracy"]["seeds"]]
    result = {key: first[key] for key in ("attack", "model", "property", "clients", "batch_size", "training_steps",
                                          "training_minutes")}
    result["simulation"] = summary(values["simulation"])
    result["federation"] = summary(values["federation"])
    result["detectors"] = {name: detector_figures(scores, name) for name, scores in values["detectors"].items()}
    result["first_round"] = {
        "psnr": [round(v, 2) for v in first_round["federation"]["psnr"]],
        "detectors": {name: detector_figures(scores, name) for name, scores in first_round["detectors"].items()}}
    result["accuracy"] = {"rounds": first["accuracy"]["rounds"], "lr": first["accuracy"]["lr"], "seeds": seeds,
                          **{label: [v for run in runs for v in run["accuracy"][label]]
                             for label in ("disguise", "honest")},
                          "disguise_sent": first["accuracy"].get("disguise_sent")}
    result["command"] = first["command"].replace(f"--seeds {first['accuracy']['seeds'][0]}",
                                                 f"--seeds {','.join(map(str, seeds))}")
    # the frontier's figures (benchmarks/frontier.py `add_disguise`): the simulation's reads of the checkpoint as sent
    # and each detector's share of the round it is sent in
    result.update({key: result["simulation"][key] for key in ("psnr_median", "psnr_worst", "share_20db", "share_30db")})
    result["detectors_first_round"] = result["first_round"]["detectors"]
    if flower:
        result["flower_secagg"] = flower_runs(flower, first["property"])
    print(json.dumps(result, indent=1))
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")


THRESHOLDS: dict[str, float] = {}
# --fit-units: the kurtosis a row of the units refit between rounds stays under (an inspecting client flags a row
# above 20: clients/inspection.py PEAKED; honest rows stay under 5; bounded by the checkpoint's own 10.3, the fits of
# later rounds were held so far from their targets that the units stopped firing)
PEAK = 15.0


def detector_figures(scores: list[float], name: str) -> dict:
    """A detector's share of flagged client-rounds, its median and largest score, and its threshold."""
    values = np.array(scores)
    threshold = THRESHOLDS[name]
    flagged = int((~(values <= threshold)).sum())
    return {"client_rounds": len(values), "flagged": flagged, "flagged_share": flagged / len(values),
            "median": float(np.median(values)), "max": float(values.max()), "threshold": threshold}


def read(decoder: Decoder, config: DisguiseConfig, rows: torch.Tensor, bias: torch.Tensor, images: torch.Tensor,
         model: torch.nn.Module, generator: torch.Generator, out: dict[str, list[float]],
         lr: float | None = None, match: int = 0) -> None:
    """Reads one round's units' mean gradient (SecAgg+'s rounding at the clients' `lr` added, None: the training's;
    `match` steps of `match_features`) and scores it against the chosen image."""
    noise = config.noise * (config.lr / lr if lr else 1.0)
    rows = rows + noise * torch.randn(rows.shape, generator=generator, dtype=rows.dtype)
    bias = bias + noise * torch.randn(bias.shape, generator=generator, dtype=bias.dtype)
    model.eval()
    image, unit = decode_round(decoder, config, rows, bias, lr, model, match)
    scores = property_scores(images, config.property)
    chosen = int(scores.argmax())
    out["psnr"].append(psnr(image, images[chosen]))
    out["ssim"].append(ssim(image, images[chosen]))
    out["fired_one"].append(float(unit >= 0 and int((scores > config.thresholds[unit]).sum()) == 1))
    with torch.no_grad():
        _, h = layer_inputs_of(model, config.layer, images[chosen:chosen + 1])
        out["oracle"].append(psnr(decoder(h)[0], images[chosen]))


def aggregate_rounds(model: torch.nn.Module, decoder: Decoder, config: DisguiseConfig, test, seeds: list[int],
                     args: argparse.Namespace) -> dict[str, list[float]]:
    """The aggregate-only simulation on the test split (module docstring)."""
    out: dict[str, list[float]] = defaultdict(list)
    model.train()
    count = args.clients * args.batch_size
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        for _ in range(args.sim_rounds):
            pick = torch.randperm(len(test), generator=generator)[:count].numpy()
            images, labels = test.tensors(pick)
            rows, bias = unit_gradients(model, config.layer, config.units, images, labels, args.clients)
            read(decoder, config, rows.detach().double(), bias.detach().double(), images, model, generator, out,
                 match=args.match)
            model.train()
    return out


def federate(label: str, start: dict[str, torch.Tensor] | None, decoder: Decoder, config: DisguiseConfig, train,
             test, seed: int, args: argparse.Namespace):
    """One FedSGD federation (module docstring): the detectors' scores on every client-round, the attack's reads
    of every round (the disguised federation), the last model's test accuracy, and for every round after the first
    the least relative change of a conv or linear weight since the model sent the round before."""
    run = RunConfig(num_clients=args.clients, seed=seed)
    settings = TrainingSettings(lr=args.lr, local_steps=1, batch_size=args.batch_size, momentum=run.momentum)
    shards = client_shards(train.labels, args.clients, run.partition, run.alpha, seed, run.min_shard, run.max_shard)
    (channels, size, _), classes = image_spec(train)
    agreed = build_model(config.model, channels, size, classes)
    model = build_model(config.model, channels, size, classes, seed=seed)
    if start is not None:
        model.load_state_dict(start)
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sent = global_weights  # the model sent the round before
    passed: dict[int, dict[str, torch.Tensor]] = {}
    scores: dict[str, list[float]] = defaultdict(list)
    reads: dict[str, list[float]] = defaultdict(list)
    least: list[float] = []
    names = [spec.name for spec in detector_specs()]
    generator = torch.Generator().manual_seed(seed)
    public = test.tensors(np.arange(len(test)))[0]  # the server's images, for the refits of the decoder and units
    for server_round in range(1, args.rounds + 1):
        if start is not None and args.slow is not None and server_round > 1:  # the server's change to what it sends
            global_weights = backbone_slowed(global_weights, sent, config, args.slow)
        if start is not None and args.fit_units and server_round > 1:
            global_weights = dict(units_fitted(model, config, global_weights, public))
        if server_round > 1:
            least.append(min(float((global_weights[name] - sent[name]).norm() / sent[name].norm())
                             for name, tensor in global_weights.items() if tensor.dim() > 1))
        news, batches, sent = [], [], global_weights
        for client in range(args.clients):
            examples = training_examples(shards[client], settings, seed, client, server_round)
            images, labels = train.tensors(examples)
            batches.append((images, labels))
            loaded = copy.deepcopy(agreed)
            loaded.load_state_dict(global_weights, strict=True)
            for name in names if start is not None else ():  # the honest rates: benchmarks/detectors.py
                verdict = run_detector(name, Sent(global_weights, agreed, loaded, images, labels, passed.get(client)))
                scores[name].append(verdict.score)
                THRESHOLDS[name] = verdict.threshold
                if name == INSPECT and not verdict.flagged:
                    passed[client] = global_weights
            loaded.train()
            local_train(loaded, images, labels, settings)
            news.append({k: v.detach() for k, v in loaded.state_dict().items()})
        mean = {k: torch.stack([n[k].double() for n in news]).mean(0) for k in global_weights}
        if start is not None:
            update = {k: mean[k] - global_weights[k].double() for k in (f"{config.layer}.weight",
                                                                         f"{config.layer}.bias")}
            index = torch.as_tensor(config.units)
            rows = -update[f"{config.layer}.weight"][index] / settings.lr
            bias = -update[f"{config.layer}.bias"][index] / settings.lr
            model.load_state_dict(global_weights)
            reader = decoder
            if args.refit and server_round > 1:
                reader = refit_decoder(decoder, model, config.layer, public, args.refit, seed=server_round)
            read(reader, config, rows, bias, torch.cat([b[0] for b in batches]), model, generator, reads, settings.lr,
                 args.match)
        global_weights = {k: mean[k].to(v.dtype) for k, v in global_weights.items()}
    model.load_state_dict(global_weights)
    return scores, reads, test_accuracy(model, test), least


def units_fitted(model: torch.nn.Module, config: DisguiseConfig, weights: Weights, public: torch.Tensor) -> Weights:
    """`weights` with the units' rows fitted again to their thresholds on the server's images (attacker/disguise.py
    `fit_units`, no row above PEAK): --fit-units, the alternative to slowing the backbone measured in docs/attacks.md.

    Parameters
    ----------
    model : nn.Module
        The run's model (it is loaded with `weights`).
    config : DisguiseConfig
        The checkpoint's config: the layer, units and thresholds.
    weights : Weights
        The global model.
    public : torch.Tensor
        (N, C, H, W) the server's images.

    Returns
    -------
    Weights
        A copy of `weights` whose layer weight and bias are refit (in their own dtypes); every other entry as given.
    """
    model.load_state_dict(weights, strict=True)
    weight, bias = fit_units(model, config, public, peak=PEAK)
    names = f"{config.layer}.weight", f"{config.layer}.bias"
    return {**weights, names[0]: weight.to(weights[names[0]].dtype), names[1]: bias.to(weights[names[1]].dtype)}


def test_accuracy(model: torch.nn.Module, test) -> float:
    """The model's accuracy on the whole test split (evaluation mode)."""
    model.eval()
    with torch.no_grad():
        images, labels = test.tensors(np.arange(len(test)))
        return float((model(images).argmax(1) == labels).double().mean())


def summary(values: dict[str, list[float]]) -> dict:
    """The PSNR median, worst and shares at 20 and 30 dB, the SSIM median, the share of rounds read off a unit
    fired by the chosen image alone, and the decoder's ceiling."""
    p = np.array(values["psnr"])
    return {"rounds": len(p), "psnr_median": round(float(np.median(p)), 2), "psnr_worst": round(float(p.min()), 2),
            "share_20db": round(float((p >= 20).mean()), 3), "share_30db": round(float((p >= 30).mean()), 3),
            "ssim_median": round(float(np.median(values["ssim"])), 3),
            "fired_one_share": round(float(np.mean(values["fired_one"])), 3),
            "oracle_psnr_median": round(float(np.median(values["oracle"])), 2)}


def figures(values: dict[str, list[float]]) -> str:
    s = summary(values)
    return (f"PSNR median {s['psnr_median']} dB, worst {s['psnr_worst']}, >= 20 dB {s['share_20db']:.1%}, >= 30 dB "
            f"{s['share_30db']:.1%}, SSIM median {s['ssim_median']}, read off one image {s['fired_one_share']:.1%}, "
            f"decoder ceiling {s['oracle_psnr_median']} dB")


if __name__ == "__main__":
    main()
