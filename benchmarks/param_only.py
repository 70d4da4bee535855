"""Parameter-only active attacks (trap, qbi) on a user's own architecture: what they recover, and whether
`--defense inspect` sees them.

Two plain user models, loaded by the client with `load_state_dict(strict=True)`: an MLP (Flatten, Linear(3072,
W), ReLU, Linear(W, 10)) and the Flower quickstart's Net (conv 3->6 5x5, max-pool 2, conv 6->16 5x5, max-pool
2, fc 400->120->84->10), both with the quickstart's input normalization (mean 0.5, std 0.5 per channel) as a
forward pre-hook, untrained (PyTorch's initialisation, drawn from the seed). Held-out CIFAR-10 (the shared
subset): victims' images from train/, the server's public images from test/. Each victim trains with plain
torch (SGD, cross-entropy): FedSGD (one step of B, lr 0.1), and one local epoch in batches of 32 over 64 images,
lr 0.1, momentum 0.9 (the quickstart's defaults), shuffled by the victim's own seed. Images are scored after
optimal matching (fl_sim/results/metrics.py); an image the attack marks unrecovered counts as 0 dB. "read" scores
the same images against what the layer's input holds of each victim image (its own carried values, decoded as
the readout decodes them): the share read exactly, whatever the carrying loses.

Detection: clients/inspection.py `inspect_model`, as `InspectMod` calls it, on each armed model against the
honest architecture, in a client's first round (no previous model) and after an honest round (the previous
model: the honest global one); false positives: the honest models themselves, the same two ways (the previous
model one honest local step back).

    OMP_NUM_THREADS=1 python benchmarks/param_only.py --seeds 0 1 2 --victims 4
"""
import copy
import time

import common
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clients.inspection import Architecture, inspect_model
from fl_sim.contract.protocol import TrainingSettings, TrainMode
from fl_sim.learning.data import load_dataset
from fl_sim.results import metrics
from fl_sim.results.evaluation import mark_unrecovered
from fl_sim.server.attacks import Observed, Victim
from fl_sim.server.param_only import QbiAttack, TrapAttack, layer_inputs

ATTACKS = {"trap": TrapAttack, "qbi": QbiAttack}
MEAN = STD = (0.5, 0.5, 0.5)


class Net(nn.Module):
    """The Flower quickstart's CNN (its layers and forward, written here)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, width), nn.ReLU(), nn.Linear(width, 10))


def normalized(model: nn.Module) -> nn.Module:
    """A copy of `model` that takes images in [0, 1] (the normalization as a forward pre-hook)."""
    model = copy.deepcopy(model)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    model.register_forward_pre_hook(lambda _module, args: ((args[0] - mean) / std, *args[1:]))
    return model


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: TrainingSettings,
          seed: int) -> None:
    """The victim's local training, plain torch: SGD over `images` in batches, shuffled by `seed`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), settings.batch_size):
            batch = order[start: start + settings.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()


def flagged(received: dict[str, torch.Tensor], architecture: Architecture,
            previous: dict[str, torch.Tensor] | None) -> bool:
    return bool(inspect_model(received, architecture, previous))


def run(args) -> tuple[list[dict], dict[str, list[bool]]]:
    train_set, test_set = load_dataset("cifar10", args.data_root, True), load_dataset("cifar10", args.data_root, False)
    public, _ = test_set.tensors(np.arange(len(test_set)))
    builders = {name: build for name, build in ((f"mlp-{args.width}", lambda: mlp(args.width)), ("net", Net))
                if name.split("-")[0] in args.models}
    trainings = [(f"fedsgd B={b}", TrainingSettings(lr=0.1, batch_size=b)) for b in args.batches]
    if not args.no_epoch:
        trainings.append(("1 epoch B=32 of 64, m=0.9", TrainingSettings(
            lr=0.1, batch_size=32, momentum=0.9, mode=TrainMode.EPOCHS, shard_size=64)))
    cells: dict[tuple[str, str, str], dict] = {}
    honest_flags: dict[str, list[bool]] = {name: [] for name in builders}
    for seed in args.seeds:
        for model_name, build in builders.items():
            torch.manual_seed(seed)
            user = build()
            honest = {name: tensor.clone() for name, tensor in user.state_dict().items()}
            architecture = Architecture.of(user)
            stepped = copy.deepcopy(user)
            x, y = train_set.tensors(np.random.default_rng(seed + 100).choice(len(train_set), 16, replace=False))
            train(normalized_load(stepped), x, y, TrainingSettings(lr=0.1, batch_size=16), seed)
            honest_flags[model_name] += [flagged(honest, architecture, None),
                                         flagged(stepped.state_dict(), architecture, honest)]
            for attack_name, attack_class in ATTACKS.items():
                attack = attack_class(normalized(user), public, 10, seed=seed)
                for label, settings in trainings:
                    cell = cells.setdefault((attack_name, model_name, label), {
                        "psnr": [], "read": [], "seconds": [], "detected": [], "what": ""})
                    started = time.perf_counter()
                    armed = attack.arm(honest, settings, [0])
                    sent = armed.weights[0]
                    cell["what"] = attack.carried.description if attack.carried is not None else ""
                    cell["detected"] += [flagged(sent, architecture, None), flagged(sent, architecture, honest)]
                    for victim in range(args.victims):
                        client = normalized(build())
                        client.load_state_dict(sent, strict=True)
                        rng = np.random.default_rng([seed, victim])
                        images, labels = train_set.tensors(rng.choice(len(train_set), settings.num_images,
                                                                      replace=False))
                        train(client, images, labels, settings, seed * 1000 + victim)
                        after = client.state_dict()
                        update = {name: after[name] - sent[name] for name in sent}
                        [result] = attack.read([Observed(Victim((victim,)), update, sent, settings)], armed, seed)
                        row = metrics.score(result.images, result.labels, images, labels)
                        if result.image_status is not None:
                            mark_unrecovered(row, result.image_status)
                        cell["psnr"] += row["psnr_images"]
                        # the most the layer's input holds: each image decoded from its own carried values
                        carried = attack.carried
                        assert carried is not None
                        inputs = layer_inputs(client_model(build, sent), attack.layer, images)
                        ceiling = torch.stack([carried.image(v) for v in carried.values(inputs)]).float()
                        row = metrics.score(result.images, result.labels, ceiling, labels)
                        if result.image_status is not None:
                            mark_unrecovered(row, result.image_status)
                        cell["read"] += row["psnr_images"]
                    cell["seconds"].append(time.perf_counter() - started)
    rows = [{"attack": a, "model": m, "training": t, **cell} for (a, m, t), cell in cells.items()]
    return rows, honest_flags


def client_model(build, sent: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh user model holding `sent`, taking [0, 1] images."""
    model = normalized(build())
    model.load_state_dict(sent, strict=True)
    return model


def normalized_load(model: nn.Module) -> nn.Module:
    """`model` itself with the normalization hooked on (its parameters are trained in place)."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    model.register_forward_pre_hook(lambda _module, args: ((args[0] - mean) / std, *args[1:]))
    return model


def table(rows: list[dict], honest: dict[str, list[bool]], seeds: int, victims: int) -> str:
    lines = [f"held-out CIFAR-10, {seeds} seeds x {victims} victims; share of images at >= 20/30/40 dB after optimal "
             "matching, median PSNR; 'read': share of images whose carried layer input was read exactly (>= 40 dB "
             "against the image decoded from its own layer input); inspect detection (first round / after an honest "
             "round); seconds per seed",
             f"{'attack':6} {'model':9} {'training':26} {'images':>6} {'>=20':>6} {'>=30':>6} {'>=40':>6} "
             f"{'median':>7} {'read':>6} {'detect':>9} {'s/seed':>7}"]
    for row in rows:
        psnr = np.array(row["psnr"])
        detected = np.array(row["detected"]).reshape(-1, 2).mean(0)
        lines.append(f"{row['attack']:6} {row['model']:9} {row['training']:26} {len(psnr):6d} "
                     f"{(psnr >= 20).mean():6.0%} {(psnr >= 30).mean():6.0%} {(psnr >= 40).mean():6.0%} "
                     f"{np.median(psnr):7.1f} {(np.array(row['read']) >= 40).mean():6.0%} "
                     f"{detected[0]:4.0%}/{detected[1]:4.0%} {np.mean(row['seconds']):7.1f}")
    for model, flags in honest.items():
        pairs = np.array(flags).reshape(-1, 2).mean(0)
        lines.append(f"honest {model}: inspect flags {pairs[0]:.0%} of fresh models, {pairs[1]:.0%} after one honest "
                     "step (false positives)")
    seen: dict[str, str] = {}
    for row in rows:
        seen.setdefault(row["model"], row["what"])
    lines += [f"what reaches the layer, {model}: {what}" for model, what in seen.items()]
    return "\n".join(lines)


def main() -> None:
    parser = common.make_parser(__doc__)
    common.add_data_root(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--victims", type=int, default=4, help="victims per seed and cell")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="FedSGD batch sizes")
    parser.add_argument("--width", type=int, default=1024, help="the MLP's hidden width W")
    parser.add_argument("--models", nargs="+", choices=("mlp", "net"), default=["mlp", "net"])
    parser.add_argument("--no-epoch", action="store_true", help="FedSGD only (no local epoch of B = 32 over 64)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows, honest = run(args)
    print(table(rows, honest, len(args.seeds), args.victims))
    print(f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
