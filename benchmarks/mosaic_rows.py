"""The mosaic's share against its rows an image, one simulated SecAgg+ round at a time, without Flower.

Each seed draws a round of `--clients` clients x `--images` training images of `--dataset` (CIFAR-10 x 16 in 4 steps
of 4 by default, lr 0.05), arms the ConvNet's imprint block for SecAgg+ (clipping range 8, `--levels` quantization
levels, 2^24 by default, max weight = the images a client trains on: the server's settings of docs/findings.md) with
`--rows-per-image` rows an image, trains every client on what it was sent (as the ClientApp:
the float16 rows' weights loaded into the float32 model), sums the replies through Flower's own quantization
(`protocol_aggregate`: the masks cancel) and reads every client's images from the revealed update. It prints, per
seed, the share of the round's images at >= `--db` dB (30 by default) after optimal matching (an image the readout
did not recover counts as 0 dB) and each client's, then the median and worst over the seeds, and the bytes a client
receives.

    python benchmarks/mosaic_rows.py [--rows-per-image 6] [--clients 4] [--seeds 0 1 2 3 4] [--local-steps 4]
        [--momentum 0] [--dataset cifar10] [--images 16] [--levels 16777216] [--db 30] [--data-root DIR]
"""
import statistics

import common
import numpy as np
import torch

from attacker.analytic import UNRECOVERED
from clients.training import local_train
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import weights
from fl_sim.results import metrics
from fl_sim.server.active import public_images
from fl_sim.server.mosaic import MosaicAttack, read_clients
from fl_sim.server.secagg import SecAggParameters, protocol_aggregate, revealed_update


def one_round(train, test, rows_per_image: int, clients: int, settings: TrainingSettings, seed: int,
              images_each: int = 16, levels: int = 2**24, db: float = 30.0) -> tuple[list[float], int]:
    """One simulated round: each client's share at >= `db` dB, and the bytes one client receives."""
    protocol = SecAggParameters(3, 2, 8.0, levels, float(images_each))
    rows = clients * images_each * rows_per_image
    model = build_model("cnn", train.channels, train.image_size, train.num_classes, seed=seed, imprint=rows)
    attack = MosaicAttack(model, public_images(test, count=1024), blocks=4, protocol=protocol)
    armed = attack.arm(weights(model), settings, list(range(clients)))
    rng = np.random.default_rng(seed + 1)
    truth, replies = [], []
    for client in range(clients):
        images, labels = train.tensors(rng.choice(len(train), images_each, replace=False))
        local = build_model("cnn", train.channels, train.image_size, train.num_classes, imprint=rows)
        local.load_state_dict({name: tensor.to(armed.narrow.get(name, tensor.dtype))
                               for name, tensor in armed.weights[client].items()})
        local_train(local, images, labels, settings)
        truth.append(images)
        replies.append(weights(local))
    aggregate = protocol_aggregate(replies, [images_each] * clients, protocol)
    update, _ = revealed_update(aggregate, [armed.weights[c] for c in range(clients)], [1.0] * clients, protocol)
    assert armed.mosaic is not None
    result = read_clients(armed.mosaic, update, {client: images_each for client in range(clients)})
    shares = []
    for client, images in enumerate(truth):
        mine = [i for i, owner in enumerate(result.image_clients or []) if owner == client]
        score = metrics.score(result.images[mine], result.labels[mine], images, torch.zeros(images_each).long())
        status = np.array(result.image_status)[mine][score["order"]]
        psnr = np.where(status == UNRECOVERED, 0.0, score["psnr_images"])
        shares.append(float(np.mean(psnr >= db)))
    received = sum(t.numel() * t.to(armed.narrow.get(name, t.dtype)).element_size()
                   for name, t in armed.weights[0].items())
    return shares, received


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--rows-per-image", type=int, default=6)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--dataset", default="cifar10", choices=("cifar10", "mnist"))
    parser.add_argument("--images", type=int, default=16, help="images a client trains on")
    parser.add_argument("--levels", type=int, default=2**24, help="SecAgg+'s quantization levels")
    parser.add_argument("--db", type=float, default=30.0, help="the PSNR an image must reach to count")
    common.add_data_root(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = load_dataset(args.dataset, args.data_root, True), load_dataset(args.dataset, args.data_root, False)
    settings = TrainingSettings(lr=0.05, local_steps=args.local_steps, batch_size=args.images // args.local_steps,
                                momentum=args.momentum)
    totals = []
    for seed in args.seeds:
        shares, received = one_round(train, test, args.rows_per_image, args.clients, settings, seed, args.images,
                                     args.levels, args.db)
        totals.append(float(np.mean(shares)))
        print(f"seed {seed}: {totals[-1]:.1%} at >= {args.db:g} dB (clients {', '.join(f'{s:.0%}' for s in shares)}); "
              f"a client receives {received / 1e6:.2f} MB", flush=True)
    print(f"{args.rows_per_image} rows an image, {args.clients} {args.dataset} clients x {args.images}, "
          f"{args.local_steps} steps, momentum "
          f"{args.momentum:g}: median {statistics.median(totals):.1%}, worst {min(totals):.1%} over seeds "
          f"{' '.join(map(str, args.seeds))}")


if __name__ == "__main__":
    main()
