"""The client's detectors (clients/detectors/): their scores on honest FedAvg federations (the thresholds and the
false positives), and how often each flags every attack's armed models.

What it simulates. For each model an honest federation of --clients clients trains --rounds rounds of FedAvg with
the real client code (fl-sim run's training defaults: one epoch over a shard of 48 to 64 examples, batches of
B = 16, lr 0.05, momentum 0.9; benchmarks/inspection.py `honest_federation`), each round on a seeded sample of
--fraction of the clients, twice: from the model's initialisation ("untrained") and from the model trained
centrally as the clients train (SGD, lr 0.05, momentum 0.9, B = 16) for --pretrain-epochs passes over the training
split ("trained"; the test accuracy of the start and of the last global model are printed).
No Flower run: each sampled client of each round runs every registered detector directly on what
`DetectMod` would give it (clients/mods.py `client_sent`): the round's global model, the model it agreed to,
that model holding the weights, and its first batch of the round (clients/training.py `first_batch`, the
shuffle `local_train` draws); the inspection also against the last model of its own that passed. Those are the
honest client-rounds: a flag among them is a false positive. The thresholds in clients/detectors/ are set as a
margin above the largest honest score printed here, never from an attack.

Then each active attack (imprint, mosaic, trap, trap-quiet, qbi; the server's own code, arming the honest
runs' global models of the first --attack-rounds rounds of both federations for the training the server
configures) targets every sampled client from round 1, on CIFAR-10 at --clients clients and B = 16. A passive
attack (dlg, idlg, ig, fedavg, spear, cocktail) sends the honest global model: its row is the honest rate on
the same rounds. The imprint block has --imprint-rows rows for imprint and mosaic alike. One more row is not an
attack of the registry: the trap with its rows set to fire for 1 in 10 B images (`fire_share` 0.1), so that a
batch fires them for one image or none, the regime of a fishing attack that D-SNR was made for. A second table
gives each detector's median score on every attack's client-rounds.

    OMP_NUM_THREADS=1 python benchmarks/detectors.py
"""
import argparse
import dataclasses
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import common
import numpy as np
import torch
import torch.nn.functional as F
from inspection import arm, honest_federation

from clients.defenses import order_seed
from clients.detectors import Sent, Verdict, agreed, dsnr, lone_units, run_detector
from clients.training import first_batch
from fl_sim.contract.attacks import attack_spec
from fl_sim.contract.detectors import INSPECT, detector_specs
from fl_sim.contract.names import DatasetName
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.models import build_model
from fl_sim.learning.partition import client_shards, training_examples
from fl_sim.learning.updates import Weights, weights
from fl_sim.server.active import ImprintAttack, QuietTrapAttack, public_images
from fl_sim.server.mosaic import MosaicAttack
from fl_sim.server.param_only import QbiAttack, TrapAttack

DEFAULT_MODELS = ("lenet:mnist", "cnn:cifar10", "resnet20:cifar10")
ATTACKS = ("imprint", "mosaic", "trap", "trap-quiet", "qbi")
FISHING = "trap, fire share 0.1"  # the trap's rows set to fire for 1 in 10 B images: most batches fire them once
PASSIVE = "passive (dlg, idlg, ig, fedavg, spear, cocktail)"


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model:dataset pairs")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of each honest federation")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=1.0, help="share of clients sampled each round")
    parser.add_argument("--pretrain-epochs", type=float, default=3.0, help="the trained federation's start")
    parser.add_argument("--trained-lr", type=float, default=0.005,
                        help="the clients' learning rate in the trained federation (0.05 undoes the start)")
    parser.add_argument("--attack-rounds", type=int, default=10,
                        help="rounds of each federation attacked (0: the honest federations alone)")
    parser.add_argument("--imprint-rows", type=int, default=256)
    parser.add_argument("--scores", help="write every score to this JSON file")
    parser.add_argument("--tables", nargs="+", metavar="JSON",
                        help="print the tables of scores written before (--scores), against today's thresholds")
    common.add_data_root(parser)
    common.add_seed(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.tables:
        runs = [json.loads(Path(path).read_text()) for path in args.tables]
        print_tables({pair: scores for run in runs for pair, scores in run["honest"].items()},
                     {(pair, attack): scores for run in runs for pair, attacks in run["attacked"].items()
                      for attack, scores in attacks.items()}, runs[0]["args"])
        return
    honest: dict[str, dict[str, list[float]]] = {}
    attacked: dict[str, dict[str, dict[str, list[float]]]] = {}
    for pair in args.models:
        model, dataset = pair.split(":")
        started = time.perf_counter()
        honest[pair], attacked[pair] = measure(model, dataset, args)
        print(f"<!-- {pair}: {time.perf_counter() - started:.0f} s -->", flush=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("scores", "tables")}
    if args.scores:
        Path(args.scores).write_text(json.dumps({"args": settings, "honest": honest, "attacked": attacked}))
    print_tables(honest, {(pair, attack): scores for pair, attacks in attacked.items()
                          for attack, scores in attacks.items()}, settings)


def thresholds() -> dict[str, float]:
    """Each registered detector's threshold as the code sets it today."""
    return {"inspect": 0.0, "dsnr": dsnr.THRESHOLD, "strict-load": 0.0, "size": agreed.SIZE_MARGIN,
            "lone-units": lone_units.THRESHOLD}


def print_tables(honest: dict[str, dict[str, list[float]]], detected: dict[tuple[str, str], dict[str, list[float]]],
                 settings: dict) -> None:
    """The false-positive table, the detection table and the attacks' median scores, as markdown."""
    names = [spec.name for spec in detector_specs()]
    limits = thresholds()
    print(f"\nhonest FedAvg, {settings['clients']} clients, a share {settings['fraction']:g} sampled a round, "
          f"{settings['rounds']} rounds untrained + {settings['rounds']} trained (from {settings['pretrain_epochs']:g} "
          f"central epochs, clients' lr {settings['trained_lr']:g}), B = 16, seed {settings['seed']}: each detector's "
          "largest honest score (median), its threshold, and the client-rounds it flagged")
    print("| model | data | client-rounds | " + " | ".join(names) + " |")
    print("| --- | --- | ---: |" + " --- |" * len(names))
    for pair, scores in honest.items():
        model, dataset = pair.split(":")
        count = len(scores[names[0]])
        cells = []
        for name in names:
            values = np.array(scores[name])
            flagged = int((~(values <= limits[name])).sum())
            cells.append(f"max {values.max():.3g} (median {np.median(values):.3g}), threshold {limits[name]:.3g}: "
                         f"**{flagged} flagged ({flagged / count:.1%})**")
        print(f"| {model} | {dataset} | {count} | " + " | ".join(cells) + " |")
    print(f"\ndetection rate of each attack, CIFAR-10, {settings['clients']} clients x B = 16, every sampled client of "
          f"the first {settings['attack_rounds']} rounds of both federations (client-rounds flagged / attacked)")
    print("| model | attack | " + " | ".join(names) + " |")
    print("| --- | --- |" + " ---: |" * len(names))
    for (pair, attack), attack_scores in detected.items():
        flags = {name: [not score <= limits[name] for score in attack_scores[name]] for name in names}
        cells = [f"{np.mean(flags[name]):.0%} ({sum(flags[name])}/{len(flags[name])})" for name in names]
        print(f"| {pair.split(':')[0]} | {attack} | " + " | ".join(cells) + " |")
    print("\nmedian score of each detector on the same client-rounds (thresholds: "
          + ", ".join(f"{name} {limits[name]:.3g}" for name in names) + ")")
    print("| model | attack | " + " | ".join(names) + " |")
    print("| --- | --- |" + " ---: |" * len(names))
    for (pair, attack), attack_scores in detected.items():
        print(f"| {pair.split(':')[0]} | {attack} | "
              + " | ".join(f"{np.median(attack_scores[name]):.3g}" for name in names) + " |")


def pretrained(model: str, dataset: str, args: argparse.Namespace) -> tuple[Weights, float]:
    """The model trained centrally as `fl-sim pretrain` trains it (Adam, lr 1e-3, batches of 64) for
    --pretrain-epochs passes over the training split, and its accuracy on the test split."""
    train, test = cached_dataset(dataset, args.data_root, True), cached_dataset(dataset, args.data_root, False)
    (channels, size, _), classes = image_spec(train)
    network = build_model(model, channels, size, classes, seed=args.seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    generator = np.random.default_rng(args.seed)
    b = 64
    steps = round(args.pretrain_epochs * len(train) / b)
    order = np.concatenate([generator.permutation(len(train)) for _ in range(int(np.ceil(args.pretrain_epochs)))])
    network.train()
    for step in range(steps):
        images, labels = train.tensors(order[step * b:(step + 1) * b])
        optimizer.zero_grad()
        F.cross_entropy(network(images), labels).backward()
        optimizer.step()
    return weights(network), test_accuracy(network, test)


def test_accuracy(network: torch.nn.Module, test) -> float:
    """The share of the test split `network` classifies right."""
    network.eval()
    with torch.no_grad():
        images, labels = test.tensors(np.arange(len(test)))
        return float((network(images).argmax(1) == labels).double().mean())


def measure(model: str, dataset: str, args: argparse.Namespace
            ) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """Every detector's honest scores for one model (both federations), and each attack's scores per detector
    (CIFAR-10 only)."""
    config = RunConfig(model=model, dataset=DatasetName(dataset), data_root=args.data_root,
                       num_clients=args.clients, attack="none", seed=args.seed)
    train = cached_dataset(dataset, args.data_root, True)
    (channels, size, _), classes = image_spec(train)
    shards = client_shards(train.labels, config.num_clients, config.partition, config.alpha, config.seed,
                           config.min_shard, config.max_shard)
    agreed_model = build_model(model, channels, size, classes)
    start, accuracy = pretrained(model, dataset, args)
    trained = dataclasses.replace(config, lr=args.trained_lr)
    federations = {"untrained": (config, *honest_federation(config, train, args)),
                   "trained": (trained, *honest_federation(trained, train, args, start))}
    test = cached_dataset(dataset, args.data_root, False)
    print(f"<!-- {model}:{dataset}: test accuracy of the centrally trained start {accuracy:.1%}; of the last global "
          f"model of each federation: " + ", ".join(
              f"{label} {test_accuracy(holding(agreed_model, history[-1]), test):.1%}"
              for label, (_, _, history) in federations.items()) + " -->", flush=True)

    def batch(client: int, server_round: int) -> tuple[torch.Tensor, torch.Tensor]:
        examples = training_examples(shards[client], config.training, config.seed, client, server_round)
        return first_batch(*train.tensors(examples), config.training, order_seed(config.seed, client, server_round))

    names = [spec.name for spec in detector_specs()]
    scores: dict[str, list[float]] = defaultdict(list)
    for label, (_, sampled, history) in federations.items():
        fired: Counter[str] = Counter()  # what a flagged honest client-round was flagged for
        for verdicts in client_rounds(sampled, history, agreed_model, agreed_model, batch, names):
            for name, verdict in verdicts.items():
                scores[name].append(verdict.score)
                if verdict.flagged:
                    fired.update(f"{name} {part.split(':')[0]}" for part in verdict.detail.split("; "))
        print(f"<!-- {model}:{dataset} {label}: "
              + ", ".join(f"{name} max {max(scores[name]):.3g}" for name in names)
              + (f"; honest flags: {', '.join(f'{what} {count}' for what, count in fired.most_common())}"
                 if fired else "") + " -->", flush=True)
    attacked: dict[str, dict[str, list[float]]] = {}
    if dataset != "cifar10" or not args.attack_rounds:
        return dict(scores), attacked
    public = public_images(test)
    rounds = args.attack_rounds
    attacked[PASSIVE] = defaultdict(list)
    for _, sampled, history in federations.values():
        for verdicts in client_rounds(sampled[:rounds], history[:rounds], agreed_model, agreed_model, batch, names):
            for name, verdict in verdicts.items():
                attacked[PASSIVE][name].append(verdict.score)
    for name in (*ATTACKS, FISHING):
        if not attack_spec(name.split(",")[0]).reaches(model):
            continue
        flags: dict[str, list[float]] = defaultdict(list)
        for federation, sampled, history in federations.values():
            attack, client_model = build(name, model, channels, size, classes, public, args)
            design = federation.training.for_shard(federation.max_attack_images)
            for verdicts in client_rounds(sampled[:rounds], history[:rounds], agreed_model, client_model, batch,
                                          names, (attack, design)):
                for detector, verdict in verdicts.items():
                    flags[detector].append(verdict.score)
        attacked[name] = flags
        print(f"<!-- {model} {name}: median scores " + ", ".join(f"{d} {np.median(flags[d]):.3g}" for d in names)
              + " -->", flush=True)
    return dict(scores), {attack: dict(values) for attack, values in attacked.items()}


def holding(model: torch.nn.Module, state: Weights) -> torch.nn.Module:
    """`model` with `state` loaded."""
    model.load_state_dict(state)
    return model


def build(name: str, model: str, channels: int, size: int, classes: int, public: torch.Tensor,
          args: argparse.Namespace):
    """The attack as the server builds it, and the model its targets train (with the imprint block where the
    attack needs it)."""
    if name in ("imprint", "mosaic"):
        imprinted = build_model(model, channels, size, classes, imprint=args.imprint_rows)
        attack = ImprintAttack(imprinted, public, classes, 4) if name == "imprint" else MosaicAttack(imprinted,
                                                                                                       public, 4)
        return attack, build_model(model, channels, size, classes, imprint=args.imprint_rows)
    if name == FISHING:
        return TrapAttack(build_model(model, channels, size, classes), public, classes, args.seed,
                          fire_share=0.1), build_model(model, channels, size, classes)
    kind = {"trap": TrapAttack, "trap-quiet": QuietTrapAttack, "qbi": QbiAttack}[name]
    return kind(build_model(model, channels, size, classes), public, classes, args.seed), build_model(
        model, channels, size, classes)


def client_rounds(sampled: list[list[int]], history: list[Weights], agreed_model: torch.nn.Module,
                  client_model: torch.nn.Module, batch, names: list[str], attack=None):
    """Each sampled client-round's verdicts (detector -> Verdict), the client sent the round's global model, or
    with `attack` (the attack and the training it arms for) its arming of it; each client keeps the last model
    that passed its inspection as its reference, as InspectMod does."""
    passed: dict[int, Weights] = {}
    for server_round, (clients, global_weights) in enumerate(zip(sampled, history), start=1):
        sent_to = arm(attack[0], global_weights, attack[1], clients) if attack is not None else None
        for client in clients:
            sent = global_weights if sent_to is None else sent_to[client]
            try:
                client_model.load_state_dict(sent)
                loaded: torch.nn.Module | None = client_model
            except RuntimeError:
                loaded = None
            images, labels = batch(client, server_round)
            verdicts: dict[str, Verdict] = {
                name: run_detector(name, Sent(sent, agreed_model, loaded, images, labels, passed.get(client)))
                for name in names}
            if not verdicts[INSPECT].flagged:
                passed[client] = sent
            yield verdicts


if __name__ == "__main__":
    main()
