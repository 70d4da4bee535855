"""IG with and without the batch-norm statistics term (AttackConfig.bn_statistics), on the same victims.

Clients train with batch norm in train mode, so their reply carries updated running means and variances
(each step blends the batch's own statistics in, momentum 0.1). `fl-sim attack` has no flag for the term
yet; this script runs the same victims (real client code, fl-sim's metrics) once per weight:

    OMP_NUM_THREADS=1 python benchmarks/bn_statistics.py --weights 0 1 --victims 2 --batch-size 2
"""
import statistics
import time

import common


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="cifar10")
    common.add_data_root(parser)
    parser.add_argument("--victims", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0])
    common.add_seed(parser)
    args = parser.parse_args()

    from attacker import get_attack, invert
    from clients.training import local_train
    from fl_sim.commands.attack import victim_indices
    from fl_sim.contract.protocol import BatchNormMode, TrainingSettings
    from fl_sim.learning.data import load_dataset
    from fl_sim.learning.models import build_model
    from fl_sim.learning.updates import weight_change, weights
    from fl_sim.results.metrics import score

    dataset = load_dataset(args.dataset, args.data_root, train=True)
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    model = build_model(args.model, *shape[:2], dataset.num_classes, init="default", seed=args.seed)
    settings = TrainingSettings(lr=0.1, local_steps=args.local_steps, batch_size=args.batch_size,
                                batchnorm=BatchNormMode.TRAIN)
    before, updates, truth = weights(model), [], []
    for victim, examples in enumerate(victim_indices(len(dataset), args.victims, settings.num_images, args.seed)):
        images, labels = dataset.tensors(examples)
        client = build_model(args.model, *shape[:2], dataset.num_classes, init="default")
        client.load_state_dict(before)
        local_train(client, images, labels, settings, order_seed=args.seed + victim)
        updates.append(weight_change(before, weights(client)))  # parameters and running statistics
        truth.append((images, labels))
    print(f"{args.model} {args.dataset}, IG {args.iterations} it., {args.victims} victims, K {args.local_steps} "
          f"x B {args.batch_size}, batch norm in train mode")
    for weight in args.weights:
        attack = get_attack("ig", bn_statistics=weight)
        started = time.perf_counter()
        results = invert(model, before, updates, settings, attack, image_shape=shape,
                         num_classes=dataset.num_classes, iterations=args.iterations, seed=args.seed, device="cpu")
        seconds = time.perf_counter() - started
        psnrs = [score(r.images, r.labels, images, labels)["psnr"] for r, (images, labels) in zip(results, truth)]
        print(f"  bn_statistics {weight:g}: PSNR median {statistics.median(psnrs):.1f} dB, min {min(psnrs):.1f}, "
              f"per victim {', '.join(f'{p:.1f}' for p in psnrs)}, {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
