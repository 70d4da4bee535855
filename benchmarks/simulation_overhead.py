"""What Flower's simulation costs: `fl-sim run` with the attack off beside the same federation in a plain loop.

Both train the same clients on the same round examples (fl_sim/partition.py) with the same local
training (clients/training.py), average as FedAvg does and evaluate the global model on the test
split after each round. The simulation runs first and pays Ray's start-up and the workers' data
loading; the plain loop loads its own data, so neither gets the other's warm cache. Prints both wall
times, their ratio, and both final accuracies (they should agree: same federation).

    .venv/bin/python benchmarks/simulation_overhead.py --data-root ../shared/data
"""
import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attacker import TrainingSettings
from clients.training import local_train
from fl_sim import cli
from fl_sim import run as fl_sim_run
from fl_sim.data import load_dataset
from fl_sim.accuracy import evaluate_model
from fl_sim.models import build_model
from fl_sim.partition import partition_indices, round_examples


def plain_federation(args) -> float:
    """FedAvg over the same clients and round examples, in one process; returns the final test accuracy."""
    train = load_dataset(args.dataset, args.data_root, train=True)
    test = load_dataset(args.dataset, args.data_root, train=False)
    settings = TrainingSettings(lr=args.lr, local_steps=args.local_steps, batch_size=args.batch_size)
    partitions = partition_indices(train.labels, args.clients, "iid", seed=args.seed)
    model = build_model(args.model, train.channels, train.image_size, train.num_classes, seed=args.seed)
    accuracy = None
    for server_round in range(1, args.rounds + 1):
        states = []
        for client, partition in enumerate(partitions):
            images, labels = train.tensors(round_examples(partition, settings.num_images, args.seed, client,
                                                          server_round))
            local = copy.deepcopy(model)
            local_train(local, images, labels, settings)
            states.append(local.state_dict())
        model.load_state_dict({name: torch.stack([s[name] for s in states]).mean(0) for name in states[0]})
        accuracy = evaluate_model(model, test, np.arange(len(test)))["accuracy"]
    return accuracy


def simulated_federation(args, out: Path) -> float:
    flags = ["run", "--dataset", args.dataset, "--model", args.model, "--num-clients", str(args.clients),
             "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--batch-size",
             str(args.batch_size), "--lr", str(args.lr), "--attack", "none", "--seed", str(args.seed),
             "--out", str(out), *(["--data-root", args.data_root] if args.data_root else [])]
    fl_sim_run.run(cli.build_parser().parse_args(flags))
    return json.loads((out / "global.jsonl").read_text().splitlines()[-1])["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        simulated_accuracy = simulated_federation(args, Path(folder) / "run")
        simulated = time.perf_counter() - started
    started = time.perf_counter()
    plain_accuracy = plain_federation(args)
    plain = time.perf_counter() - started

    print(f"{args.clients} clients x {args.rounds} rounds, K={args.local_steps} B={args.batch_size}, attack off")
    print(f"flower simulation (fl-sim run): {simulated:7.1f} s   final accuracy {simulated_accuracy:.4f}")
    print(f"plain PyTorch loop:             {plain:7.1f} s   final accuracy {plain_accuracy:.4f}")
    print(f"simulation / plain:             {simulated / plain:7.1f} x")


if __name__ == "__main__":
    main()
