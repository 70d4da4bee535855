"""What stops the FedAvg attack on many images: the attack's optimisation given the client's true epoch orders.

A diagnostic, not an attack a server can run: it is handed what no server has (each epoch's order of the
client's private shuffle, and the true labels in that order), so the n unknown images are one set, replayed
epoch by epoch in the client's own orders: the FedAvg attack's problem with the order question answered
exactly (`--view oracle`). `--view copies` is the FedAvg attack's own view (one copy per epoch, labels dealt
into a random order per epoch, the copies tied at the start and by the per-class prior, merged at the end:
attacker/fedavg.py) run by the same loop. If the oracle recovers no more than the copies, estimating the
orders better cannot help; the optimisation is what stops the attack.

The loop is Inverting Gradients' (the `ig` and `fedavg` presets of fl_sim/contract/attacks.py): 1 - cosine of the
updates, total variation 1e-2, Adam on the gradient's sign at 0.1, x0.1 at 3/8, 5/8 and 7/8 of the
iterations, pixels boxed to [0, 1]. The switches change one thing each, to test what the paper
(Dimitrov et al. 2022, eth-sri/fedavg_leakage) does differently:

- `--objective layer-l2`: their squared distance with exponentially falling layer weights (1, 1/e, 1/e^2, ...
  from the input), `layer-cosine` the cosine on the same weights;
- `--optimizer adam`: plain Adam, as theirs; `--start class-mean`: every image starts at the mean image of its
  class in the public (test) split; `--model paper-cnn`: their FEMNIST ConvNet (two 3 x 3 convolutions of 32 and
  64 channels with average pooling, a dense layer of 100); `--model-init lecun`: Flax's initialisation;
- `--client-lr`: the clients' step size (their FEMNIST scripts: 0.004).

    OMP_NUM_THREADS=1 python benchmarks/fedavg_oracle.py --view oracle --epochs 10 --shard-size 50 --iterations 200
"""
import statistics
import time

import common


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--dataset", default="mnist")
    common.add_data_root(parser)
    parser.add_argument("--model", default="cnn", help="a registry model, or paper-cnn")
    parser.add_argument("--model-init", choices=["torch", "lecun"], default="torch")
    parser.add_argument("--view", choices=["oracle", "copies"], default="oracle")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--client-lr", type=float, default=0.01)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.1, help="the attack's step size")
    parser.add_argument("--objective", choices=["cosine", "layer-l2", "layer-cosine"], default="cosine")
    parser.add_argument("--optimizer", choices=["signed-adam", "adam"], default="signed-adam")
    parser.add_argument("--decay", choices=["ig", "none"], default="ig")
    parser.add_argument("--tv", type=float, default=1e-2)
    parser.add_argument("--prior", type=float, default=1.0, help="the copies' per-class prior weight (--view copies)")
    parser.add_argument("--start", choices=["random", "class-mean"], default="random")
    parser.add_argument("--victim", type=int, default=0)
    common.add_seed(parser)
    parser.add_argument("--every", type=int, default=20, help="iterations between progress lines")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch import nn

    from attacker.fedavg import deal_labels, epoch_prior, merge_copies, tie_copies
    from attacker.objectives import cosine_distance, total_variation
    from attacker.replay import LocalTraining
    from clients.defenses import defense_seed
    from clients.training import local_train
    from fl_sim.commands.attack import victim_indices
    from fl_sim.contract.protocol import TrainingSettings, TrainMode
    from fl_sim.learning.data import load_dataset
    from fl_sim.learning.models import build_model
    from fl_sim.learning.updates import weight_change, weights
    from fl_sim.results.metrics import match, psnr

    dataset = load_dataset(args.dataset, args.data_root, train=True)
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    classes = dataset.num_classes
    n, epochs = args.shard_size, args.epochs

    def fresh_model() -> nn.Module:
        torch.manual_seed(args.seed)
        if args.model == "paper-cnn":
            side = dataset.image_size // 4
            model: nn.Module = nn.Sequential(
                nn.Conv2d(dataset.channels, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                nn.Linear(64 * side * side, 100), nn.ReLU(), nn.Linear(100, classes))
        else:
            model = build_model(args.model, *shape[:2], classes, seed=args.seed)
        if args.model_init == "lecun":  # Flax's default: truncated normal of variance 1 / fan-in, zero biases
            for module in model.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                    bound = 2 / module.weight[0].numel() ** 0.5 / 0.8796
                    nn.init.trunc_normal_(module.weight, std=bound / 2, a=-bound, b=bound)
                    nn.init.zeros_(module.bias)
        return model

    model = fresh_model()
    before = weights(model)
    settings = TrainingSettings(lr=args.client_lr, batch_size=args.batch_size, epochs=epochs, mode=TrainMode.EPOCHS,
                                shard_size=n)
    images, labels = dataset.tensors(victim_indices(len(dataset), args.victim + 1, n, args.seed)[args.victim])
    client = fresh_model()
    client.load_state_dict(before)
    order_seed = defense_seed(args.seed, args.victim, 1)  # as fl-sim attack seeds the client's shuffle
    local_train(client, images, labels, settings, order_seed=order_seed)
    update = weight_change(before, weights(client))
    generator = torch.Generator().manual_seed(order_seed)  # the client's own draws: what no server knows
    orders = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    names = [name for name, _ in model.named_parameters()]
    params = {name: before[name] for name in names}
    replay = LocalTraining(model, params, settings)
    one_hot = F.one_hot(labels, classes).float()
    with torch.no_grad():
        truth = replay(images[orders], one_hot[orders])
    error = max(float((truth[name] - update[name]).abs().max()) for name in names)
    print(f"the replay in the true orders against the client's update: max |difference| {error:.1e}")
    scale = -1.0 / settings.lr
    observed = {name: update[name] * scale for name in names}
    layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in names))  # input first
    layer_weight = {name: float(torch.exp(torch.tensor(-layers.index(name.rsplit(".", 1)[0])))) for name in names}

    def distance(replayed: dict) -> torch.Tensor:
        if args.objective == "layer-l2":
            return sum((layer_weight[k] * (replayed[k] - observed[k]).pow(2).sum() for k in names), torch.tensor(0.0))
        if args.objective == "layer-cosine":
            root = {k: layer_weight[k] ** 0.5 for k in names}
            return cosine_distance({k: replayed[k] * root[k] for k in names}, {k: observed[k] * root[k] for k in names})
        return cosine_distance(replayed, observed)

    # the oracle's images in the shard's order; the copies' labels dealt into every epoch as the engine deals them
    slots = labels if args.view == "oracle" else deal_labels(labels, epochs, args.seed)
    start = torch.rand(len(slots), *shape, generator=torch.Generator().manual_seed(args.seed + 1))
    if args.start == "class-mean":
        public = load_dataset(args.dataset, args.data_root, train=False)
        public_images, public_labels = public.tensors(range(len(public)))
        start = torch.stack([public_images[public_labels == c].mean(0) for c in range(classes)])[slots]
    if args.view == "oracle":
        z = start.requires_grad_(True)
        targets = one_hot[orders]
    else:
        targets = F.one_hot(slots, classes).float()
        z = tie_copies(start.reshape(epochs, n, -1), targets.reshape(epochs, n, -1))
        z = z.reshape(epochs * n, *shape).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=args.lr)
    milestones = [int(args.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if args.decay == "ig" else []
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)

    def report(iteration: int, loss: float, started: float) -> None:
        with torch.no_grad():
            found = z.detach().clamp(0, 1)
            if args.view == "copies":
                found, _ = merge_copies(found, targets.argmax(-1), epochs)
            matched = found[match(found, images)]
            scores = [psnr(r, t) for r, t in zip(matched, images)]
        print(f"iteration {iteration}: loss {loss:.4f}, PSNR median {statistics.median(scores):.1f} worst "
              f"{min(scores):.1f}, >= 20 dB {sum(s >= 20 for s in scores) / n:.0%}, >= 30 dB "
              f"{sum(s >= 30 for s in scores) / n:.0%}, {time.perf_counter() - started:.0f} s", flush=True)

    started = time.perf_counter()
    for iteration in range(args.iterations):
        candidates = z[orders] if args.view == "oracle" else z
        change = replay(candidates, targets)
        loss = distance({k: change[k] * scale for k in names}) + args.tv * total_variation(candidates)
        if args.view == "copies" and args.prior:
            loss = loss + args.prior * epoch_prior(z.reshape(epochs, n, *shape), targets.reshape(epochs, n, -1))
        (gradient,) = torch.autograd.grad(loss, [z])
        z.grad = gradient.sign() if args.optimizer == "signed-adam" else gradient
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            z.clamp_(0, 1)
        if iteration % args.every == 0 or iteration == args.iterations - 1:
            report(iteration, float(loss), started)


if __name__ == "__main__":
    main()
