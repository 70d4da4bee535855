"""What Flower's simulation costs: `fl-sim run` with the attack off beside the same federation in a plain loop.

Both train the same clients on the same round examples (fl_sim/learning/partition.py) with the same local
training (clients/training.py), average as FedAvg does and evaluate the global model on the test
split after each round. The simulation runs first and pays Ray's start-up and the workers' data
loading; the plain loop loads its own data, so neither gets the other's warm cache. Prints both wall
times, their ratio, and both final accuracies (they should agree: same federation).

    .venv/bin/python benchmarks/simulation_overhead.py --data-root ../shared/data

With `--compare-async`, it measures instead what `--attack-async` saves: the same `fl-sim run` with an
attack (`--attack`, `--iterations`), once synchronous (each round waits for its attack) and once with
`--attack-async` (a round's attack runs beside the next round's training), in one process, one after the
other (`--order` says which first). Prints both wall times, the saving and the ratio, and checks that both
wrote the same number of attack rows and the same global accuracies.

    .venv/bin/python benchmarks/simulation_overhead.py --data-root ../shared/data --compare-async \
        --clients 2 --rounds 5 --attack ig --iterations 200
"""
import copy
import json
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

from attacker import TrainingSettings
from clients.training import local_train
from fl_sim.commands import cli
from fl_sim.commands import run as fl_sim_run
from fl_sim.contract.records import REPLY_FAULTS
from fl_sim.learning.accuracy import evaluate_model
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.partition import partition_indices, round_examples
from fl_sim.results.outputs import read_jsonl


def plain_federation(args) -> float:
    """FedAvg over the same clients and round examples, in one process; returns the final test accuracy."""
    train = load_dataset(args.dataset, args.data_root, train=True)
    test = load_dataset(args.dataset, args.data_root, train=False)
    settings = TrainingSettings(lr=args.lr, local_steps=args.local_steps, batch_size=args.batch_size)
    partitions = partition_indices(train.labels, args.clients, "iid", seed=args.seed)
    model = build_model(args.model, train.channels, train.image_size, train.num_classes, seed=args.seed)
    accuracy = 0.0
    for server_round in range(1, args.rounds + 1):
        states = []
        for client, partition in enumerate(partitions):
            images, labels = train.tensors(round_examples(partition, settings.num_images, args.seed, client,
                                                          server_round))
            local = copy.deepcopy(model)
            local_train(local, images, labels, settings)
            states.append(local.state_dict())
        model.load_state_dict({name: torch.stack([s[name] for s in states]).mean(0) for name in states[0]})
        accuracy = float(evaluate_model(model, test, np.arange(len(test)))["accuracy"])
    return accuracy


def run_flags(args, out: Path, *extra: str) -> list[str]:
    """`fl-sim run` over the benchmark's federation (steps mode: K steps of B examples, as the plain loop)."""
    return ["run", "--dataset", args.dataset, "--model", args.model, "--num-clients", str(args.clients),
            "--rounds", str(args.rounds), "--train-mode", "steps", "--local-steps", str(args.local_steps),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed), "--out", str(out),
            *(["--data-root", args.data_root] if args.data_root else []), *extra]


def simulated_federation(args, out: Path) -> float:
    fl_sim_run.run(cli.build_parser().parse_args(run_flags(args, out, "--attack", "none")))
    return json.loads((out / "global.jsonl").read_text().splitlines()[-1])["accuracy"]


def attacked_federation(args, out: Path, background: bool) -> tuple[float, list[dict], list[float]]:
    """`fl-sim run` with the attack, synchronous or --attack-async: wall time, attack rows, global accuracies."""
    flags = run_flags(args, out, "--attack", args.attack, "--iterations", str(args.iterations),
                      "--attack-async" if background else "--no-attack-async")
    started = time.perf_counter()
    fl_sim_run.run(cli.build_parser().parse_args(flags))
    seconds = time.perf_counter() - started
    rows = [row for row in read_jsonl(out / "metrics.jsonl") if row.get("status") not in REPLY_FAULTS]
    return seconds, rows, [row["accuracy"] for row in read_jsonl(out / "global.jsonl")]


def compare_async(args) -> None:
    """The same attacked federation synchronous and with --attack-async, side by side."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for background in ([False, True] if args.order == "sync-first" else [True, False]):
            name = "async" if background else "sync"
            results[name] = attacked_federation(args, Path(folder) / name, background)
    (sync, sync_rows, sync_accuracy), (in_background, async_rows, async_accuracy) = results["sync"], results["async"]
    if len(sync_rows) != len(async_rows) or not sync_rows:
        raise SystemExit(f"the runs differ: {len(sync_rows)} attack rows synchronous, {len(async_rows)} async")
    if sync_accuracy != async_accuracy:
        raise SystemExit(f"the global accuracies differ: {sync_accuracy} against {async_accuracy}")
    def median_attack(rows):  # one round's attack (all its victims), as the rows timed it
        seconds = sorted(row["round_attack_seconds"] for row in rows)
        return seconds[len(seconds) // 2]

    print(f"{args.clients} clients x {args.rounds} rounds, K={args.local_steps} B={args.batch_size}, "
          f"{args.model}, --attack {args.attack} --iterations {args.iterations}, {args.order}, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"synchronous (fl-sim run):        {sync:7.1f} s   {len(sync_rows)} attack rows, "
          f"a round's attack {median_attack(sync_rows):.1f} s (median)")
    print(f"--attack-async:                  {in_background:7.1f} s   {len(async_rows)} attack rows, "
          f"a round's attack {median_attack(async_rows):.1f} s (median)")
    print(f"saved:                           {sync - in_background:7.1f} s ({(sync - in_background) / sync:.0%})")
    print(f"synchronous / async:             {sync / background:7.2f} x   same rows counted, same accuracies "
          f"(final {sync_accuracy[-1]:.4f})")


def main() -> None:
    parser = common.make_parser(__doc__)
    common.add_data_root(parser)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    common.add_seed(parser)
    parser.add_argument("--compare-async", action="store_true",
                        help="time an attacked run synchronous against --attack-async instead")
    parser.add_argument("--attack", default="ig", help="with --compare-async: a passive attack (dlg, idlg, ig)")
    parser.add_argument("--iterations", type=int, default=200, help="with --compare-async: the attack's iterations")
    parser.add_argument("--order", choices=("sync-first", "async-first"), default="sync-first",
                        help="with --compare-async: which run goes first (the first one warms the caches)")
    args = parser.parse_args()
    if args.compare_async:
        compare_async(args)
        return

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
