"""What each attack's model of a FedAvg update gets right before any optimisation: labels, and the fit of the truth.

An optimisation attack can at best find images whose replayed update matches the observed one. If the true
images themselves do not match under the attack's own replay, its minimum lies elsewhere. For real clients in
epochs mode (MNIST, the client's private shuffle, fl-sim's own training code) this prints, per E:

- labels right: the label multiset recovered from the bias update, counted against the model's prediction at
  the global weights (ig) or along the client's steps (fedavg: attacker.labels.path_mean_softmax);
- the attack's update distance (1 - cosine, TV off) at the true images: the first epoch's order for every epoch
  (ig's replay),
  the whole update as one gradient (--no-replay), per-epoch copies in the client's orders (fedavg: the truth
  in the form the attack optimises; zero up to float error).

    OMP_NUM_THREADS=1 python benchmarks/fedavg_floor.py --epochs 1 2 5 10 --shard-size 50 --batch-size 5 --victims 8
"""
import statistics
from dataclasses import replace

import common


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--dataset", default="mnist")
    common.add_data_root(parser)
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--victims", type=int, default=8)
    common.add_seed(parser)
    args = parser.parse_args()

    import torch

    from attacker import TrainingSettings, get_attack
    from attacker.engine import _Problem
    from attacker.labels import mean_softmax, path_mean_softmax, recover_labels
    from clients.training import local_train
    from fl_sim.commands.attack import victim_indices
    from fl_sim.contract.protocol import TrainMode
    from fl_sim.learning.data import load_dataset
    from fl_sim.learning.models import build_model
    from fl_sim.learning.updates import weight_change, weights
    from fl_sim.results.metrics import label_share

    dataset = load_dataset(args.dataset, args.data_root, train=True)
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    classes = dataset.num_classes
    model = build_model(args.model, *shape[:2], classes, init="default", seed=args.seed)
    before = weights(model)
    params = {name: before[name] for name, _ in model.named_parameters()}
    at_global = mean_softmax(model, params, shape)
    one_hot = torch.nn.functional.one_hot
    print(f"{args.dataset} {args.model}, n = {args.shard_size}, B = {args.batch_size}, {args.victims} victims, "
          f"seed {args.seed}; medians over victims")
    print("| lr | E | steps | labels right: ig / fedavg | 1 - cos at the truth: ig (one order) / no-replay / "
          "fedavg (copies) |")
    print("|---:|---:|---:|---|---|")
    for lr in args.lr:
        for epochs in args.epochs:
            settings = TrainingSettings(lr=lr, batch_size=args.batch_size, epochs=epochs, mode=TrainMode.EPOCHS,
                                        shard_size=args.shard_size)
            problems = {name: _Problem(model, params, {}, view, replace(get_attack(preset), tv_weight=0.0), shape,
                                       classes)
                        for name, preset, view in (("ig", "ig", settings), ("fedavg", "fedavg", settings),
                                           ("no-replay", "ig", settings.as_single_gradient()))}
            figures: dict[str, list[float]] = {key: [] for key in ("labels ig", "labels fedavg", "ig", "no-replay",
                                                                   "fedavg")}
            for victim, examples in enumerate(victim_indices(len(dataset), args.victims, args.shard_size,
                                                             args.seed)):
                images, labels = dataset.tensors(examples)
                client = build_model(args.model, *shape[:2], classes, init="default")
                client.load_state_dict(before)
                order_seed = 1000 * args.seed + victim
                local_train(client, images, labels, settings, order_seed=order_seed)
                update = weight_change(before, weights(client))
                path = path_mean_softmax(model, params, update, settings, shape)
                for key, p_mean in (("labels ig", at_global), ("labels fedavg", path)):
                    found = recover_labels(model, params, update, settings, shape, classes, p_mean)
                    figures[key].append(label_share(found.numpy(), labels.numpy()))
                generator = torch.Generator().manual_seed(order_seed)
                orders = [torch.randperm(len(images), generator=generator) for _ in range(epochs)]
                copies = torch.cat([images[order] for order in orders])
                first = orders[0]  # ig's one order: the client's first epoch (all it needs at E = 1)
                inputs = {"ig": (images[first], labels[first]), "no-replay": (images, labels),
                          "fedavg": (copies, torch.cat([labels[order] for order in orders]))}
                for name, (pictures, truth) in inputs.items():
                    problem = problems[name]
                    observed = {key: update[key].unsqueeze(0) * problem.scale for key in params}
                    _, value = problem.batched(pictures.reshape(1, -1), one_hot(truth, classes).float().unsqueeze(0),
                                               observed)
                    figures[name].append(float(value[0]))
            median = {key: statistics.median(values) for key, values in figures.items()}
            print(f"| {lr:g} | {epochs} | {settings.total_steps} | {median['labels ig']:.0%} / "
                  f"{median['labels fedavg']:.0%} | {median['ig']:.4f} / {median['no-replay']:.4f} / "
                  f"{median['fedavg']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
