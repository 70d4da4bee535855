"""Client-side inspection (`--defense inspect`): false positives on honest FedAvg, detection of each attack.

For each model an honest federation trains for --rounds rounds of FedAvg with the real client code (fl-sim run's
training defaults: one epoch over a shard of 48 to 64 examples, batches of 16, lr 0.05, momentum 0.9), each round
on a seeded sample of --fraction of the --clients clients. Every sampled client inspects the model it is sent
(clients/inspection.py) against the last model of its own that passed, as `InspectMod` does in a ClientApp:
those are the honest client-rounds, and every flag among them is a false positive. A passive attack (dlg, idlg,
ig) sends exactly these models, so its detection rate is this false-positive rate.

Each active attack then targets every client from its first sampled round on: the client is sent the attack's
arming of that round's global model instead (fl_sim/server/active.py, the server's own code, built on the honest
run's global models), inspects it against its own last passed model (a model that failed never becomes the
reference), and every flag is a detection. The table says which checks fired. The quiet trap (the evader) is
also measured switched on halfway through a run, after honest rounds: "from round R" counts its rounds from R.

    OMP_NUM_THREADS=1 python benchmarks/inspection.py --rounds 24 --clients 5
"""
import argparse
import time
from collections import Counter

import common
import numpy as np
import torch

from clients import inspection
from clients.app import order_seed
from clients.inspection import Architecture, inspect_model, largest_row_cosine, largest_row_kurtosis
from clients.training import local_train
from fl_sim.contract.attacks import attack_spec
from fl_sim.contract.names import DatasetName
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.models import build_model
from fl_sim.learning.partition import client_shards, training_examples
from fl_sim.learning.updates import Weights, weights
from fl_sim.server.active import AnalyticAttack, ImprintAttack, QuietTrapAttack, TrapAttack, public_images
from fl_sim.server.mosaic import MosaicAttack

DEFAULT_MODELS = ("cnn:mnist", "lenet:cifar10", "resnet20:cifar10", "mlp:mnist", "cnn:cifar10")
# attack -> models (None: all). trap needs a ReLU first layer that can pass the image on (fl-sim's TrapAttack builds
# it for the MLP and the ConvNet only; for LeNet and ResNet-20 it refuses to arm, so there is nothing to detect)
ATTACKS = ("imprint", "mosaic", "trap", "trap-quiet")
IMPRINT_ROWS = 256


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="model:dataset pairs")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.6, help="share of clients sampled each round")
    common.add_data_root(parser)
    common.add_seed(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.rounds} rounds, {args.clients} clients, {args.fraction:g} sampled per round, seed {args.seed}")
    print("| model | data | sent | client-rounds | flagged | rate | checks that fired |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for pair in args.models:
        model, dataset = pair.split(":")
        started = time.perf_counter()
        for line in measure(model, dataset, args):
            print(line, flush=True)
        print(f"<!-- {pair}: {time.perf_counter() - started:.0f} s -->", flush=True)


def measure(model: str, dataset: str, args: argparse.Namespace) -> list[str]:
    """The table's rows for one model: the honest federation's models, then each attack's arming of them."""
    config = RunConfig(model=model, dataset=DatasetName(dataset), data_root=args.data_root,
                       num_clients=args.clients, attack="none", seed=args.seed)
    train = cached_dataset(dataset, args.data_root, True)
    (channels, size, _), classes = image_spec(train)
    honest = Architecture.of(build_model(model, channels, size, classes))
    sampled, history = honest_federation(config, train, args)
    rows = [row(model, dataset, "honest model (and passive attacks)", *inspect_run(sampled, history, honest, None)),
            margins(model, dataset, sampled, history, honest)]
    public = public_images(cached_dataset(dataset, args.data_root, False))
    design = config.training.for_shard(config.max_attack_images)
    for name in ATTACKS:
        if not attack_spec(name).reaches(model):
            continue
        attack = build(name, model, channels, size, classes, public, args.seed)
        rows.append(row(model, dataset, name, *inspect_run(sampled, history, honest, (attack, design))))
        if name == "trap-quiet":
            start = args.rounds // 2 + 1
            attack = build(name, model, channels, size, classes, public, args.seed)
            rows.append(row(model, dataset, f"{name} from round {start}",
                            *inspect_run(sampled, history, honest, (attack, design), start)))
    return rows


def honest_federation(config: RunConfig, train, args: argparse.Namespace,
                      start: Weights | None = None) -> tuple[list[list[int]], list[Weights]]:
    """FedAvg with the real client code: who was sampled in each round, and the global model each round sent
    (from `start`, else the model's initialisation drawn from the seed)."""
    (channels, size, _), classes = image_spec(train)
    shards = client_shards(train.labels, config.num_clients, config.partition, config.alpha, config.seed,
                           config.min_shard, config.max_shard)
    generator = np.random.default_rng(args.seed)
    count = max(1, round(args.fraction * config.num_clients))
    global_weights = dict(start) if start is not None else weights(
        build_model(config.model, channels, size, classes, seed=config.seed))
    sampled, history = [], []
    for server_round in range(1, args.rounds + 1):
        clients = sorted(generator.choice(config.num_clients, count, replace=False).tolist())
        sampled.append(clients)
        history.append(global_weights)
        replies, counts = [], []
        for client in clients:
            local = build_model(config.model, channels, size, classes)
            local.load_state_dict(global_weights)
            examples = training_examples(shards[client], config.training, config.seed, client, server_round)
            images, labels = train.tensors(examples)
            local_train(local, images, labels, config.training,
                        order_seed=order_seed(config.seed, client, server_round))
            replies.append(weights(local))
            counts.append(len(examples))
        total = sum(counts)
        global_weights = {name: (torch.stack([reply[name].double() * n for reply, n in zip(replies, counts)]).sum(0)
                                 / total).to(tensor.dtype) for name, tensor in global_weights.items()}
    return sampled, history


def margins(model: str, dataset: str, sampled: list[list[int]], history: list[Weights], honest: Architecture) -> str:
    """The largest figure each statistical check saw on the honest models, beside its threshold: how far from a
    false positive the honest run stayed (0 flags in n client-rounds alone bounds the rate only by about 3/n)."""
    kurtosis = cosine = zeros = jump = 0.0
    last: dict[int, Weights] = {}
    for clients, sent in zip(sampled, history):
        for weight, _ in honest.layers():
            rows = sent[weight].float().flatten(1)
            kurtosis = max(kurtosis, largest_row_kurtosis(rows))
            cosine = max(cosine, largest_row_cosine(rows))
            zeros = max(zeros, float((rows == 0).float().mean()))
            for client in clients:
                if client in last:
                    before = last[client][weight].double()
                    jump = max(jump, float((sent[weight].double() - before).norm() / before.norm()))
        last.update({client: sent for client in clients})
    return (f"| {model} | {dataset} | largest honest figures (threshold) | | | | kurtosis {kurtosis:.2f} "
            f"({inspection.PEAKED:g}), cosine {cosine:.4f} ({inspection.DUPLICATE_COSINE:g}), zero share {zeros:.3f} "
            f"({inspection.ZERO_SHARE:g}), jump {jump:.3f} ({inspection.JUMP:g}) |")


Sender = AnalyticAttack | MosaicAttack


def build(name: str, model: str, channels: int, size: int, classes: int, public: torch.Tensor,
          seed: int) -> Sender:
    if name == "imprint":
        return ImprintAttack(build_model(model, channels, size, classes, imprint=IMPRINT_ROWS), public, classes, 4)
    if name == "mosaic":  # per-client models: each sampled client its own live slice of the imprint rows
        return MosaicAttack(build_model(model, channels, size, classes, imprint=IMPRINT_ROWS), public, 4)
    kind = QuietTrapAttack if name == "trap-quiet" else TrapAttack
    return kind(build_model(model, channels, size, classes), public, classes, seed)


def inspect_run(sampled: list[list[int]], history: list[Weights], honest: Architecture,
                attack: tuple[Sender, TrainingSettings] | None, start: int = 1) -> tuple[int, int, Counter]:
    """(client-rounds, flagged, how often each check fired) over the run, each client keeping its last passed
    model as InspectMod does; with `attack` (the attack and the training it arms for) every client-round from
    round `start` on is sent the attack's arming of the round's global model (and only those are counted)."""
    passed: dict[int, Weights] = {}
    total, flagged, fired = 0, 0, Counter[str]()
    for server_round, (clients, global_weights) in enumerate(zip(sampled, history), start=1):
        armed = attack is not None and server_round >= start
        armed_for = arm(attack[0], global_weights, attack[1], clients) if attack is not None and armed else None
        for client in clients:
            sent = global_weights if armed_for is None else armed_for[client]
            if attack is not None and not armed:  # an honest round before the attack starts: not counted
                if not inspect_model(sent, honest, passed.get(client)):
                    passed[client] = sent
                continue
            findings = inspect_model(sent, honest, passed.get(client))
            total += 1
            if findings:
                flagged += 1
                fired.update({finding.check.label for finding in findings})
            else:
                passed[client] = sent
    return total, flagged, fired


def arm(attack: Sender, global_weights: Weights, design: TrainingSettings, clients: list[int]) -> dict[int, Weights]:
    """What the attack sends each of the round's clients when the round's global model is `global_weights`."""
    if isinstance(attack, ImprintAttack | MosaicAttack):  # the imprint block in front of the federation's model
        block = {name: tensor for name, tensor in attack.model.state_dict().items() if not name.startswith("base.")}
        global_weights = {**block, **{f"base.{name}": tensor for name, tensor in global_weights.items()}}
    if isinstance(attack, MosaicAttack):
        return dict(attack.arm(global_weights, design, clients).weights)
    armed, _ = attack.surgery(global_weights, design)
    return {client: armed for client in clients}


def row(model: str, dataset: str, sent: str, total: int, flagged: int, fired: Counter) -> str:
    checks = ", ".join(f"{label} {count}" for label, count in fired.most_common()) or "-"
    return f"| {model} | {dataset} | {sent} | {total} | {flagged} | {flagged / max(total, 1):.1%} | {checks} |"


if __name__ == "__main__":
    main()
