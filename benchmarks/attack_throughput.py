"""Victim-iterations per second: the one-at-a-time loop that DLG / IG / breaching run, against the
vectorised engine at the given victim counts, same model, same attack, measured side by side.

An iteration is, for IG, one evaluation of the attack's loss and its gradient with respect to the
dummy images plus one Adam update; for iDLG one L-BFGS step() of the DLG code (up to 20 updates). The loop does it
the usual way, one victim at a time: the model's
gradient with create_graph=True, the distance, backward, an optimiser step. The engine does all
victims in one vmapped call. Memory per victim: the peak CUDA allocation on a GPU, the engine's own
estimate from tensor sizes on the CPU.

    python benchmarks/attack_throughput.py [--victims 64 256 1024] [--model lenet|resnet20] [--attack ig|idlg]
        [--device cuda] [--compile] [--json FILE]
"""
import json
import platform
import time
from datetime import date
from functools import partial

import common
import torch
import torch.nn.functional as F

from attacker import TrainingSettings, get_attack, invert, resolve_device
from clients.training import local_train
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import weight_change, weights


def synthetic_updates(model_name, model, victims: int, shape, classes: int, settings: TrainingSettings, device):
    """Real SGD weight changes from random images: throughput does not depend on what the images show."""
    before, updates = weights(model), []
    generator = torch.Generator().manual_seed(0)
    for _ in range(victims):
        client = build_model(model_name, shape[0], shape[1], classes).to(device)
        client.load_state_dict(before)
        images = torch.rand(1, *shape, generator=generator).to(device)
        labels = torch.randint(0, classes, (1,), generator=generator).to(device)
        local_train(client, images, labels, settings)
        updates.append(weight_change(before, weights(client)))
    return before, updates


def loop_attack(model, before, update, settings, iterations, shape, classes, device, recipe="ig", tv_weight=1e-2):
    """The reference style, one victim: autograd with create_graph, then for IG the cosine + TV loss,
    Adam on signed gradients and a box; for iDLG the squared distance and torch's L-BFGS (20 evaluations
    per step, no line search), as the DLG code. The label is read off the last bias, as both do."""
    params = {name: before[name] for name, _ in model.named_parameters()}
    model.load_state_dict(before)
    model.train()
    names = list(params)
    observed = [-update[name] / settings.lr for name in names]
    label = update[_last_bias(model)].argmax().reshape(1)  # the one class whose bias went up
    dummy = torch.rand(1, *shape, device=device, requires_grad=True)
    weights_list = [p for _, p in model.named_parameters()]

    def gradients():
        loss = F.cross_entropy(model(dummy), label)
        return torch.autograd.grad(loss, weights_list, create_graph=True)

    if recipe == "idlg":
        optimizer = torch.optim.LBFGS([dummy])

        def closure():
            optimizer.zero_grad()
            cost = sum(((g - o) ** 2).sum() for g, o in zip(gradients(), observed))
            cost.backward()
            return cost

        for _ in range(iterations):
            optimizer.step(closure)
        return dummy.detach()
    optimizer = torch.optim.Adam([dummy], lr=0.1)
    for _ in range(iterations):
        optimizer.zero_grad()
        grads = gradients()
        dot = sum((g * o).sum() for g, o in zip(grads, observed))
        norm = sum((g * g).sum() for g in grads).sqrt() * sum((o * o).sum() for o in observed).sqrt()
        cost = 1 - dot / norm
        dx = (dummy[..., 1:] - dummy[..., :-1]).abs().mean() + (dummy[..., 1:, :] - dummy[..., :-1, :]).abs().mean()
        (cost + tv_weight * dx).backward()
        dummy.grad.sign_()
        optimizer.step()
        with torch.no_grad():
            dummy.clamp_(0, 1)
    return dummy.detach()


def _last_bias(model) -> str:
    return [name for name, _ in model.named_parameters() if name.endswith("bias")][-1]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def engine_memory_per_victim(stats: dict, victims: int) -> float:
    """The engine's own figure (CPU: estimated from tensor sizes; CUDA: one row measured), MiB per victim."""
    rows_per_victim = stats["rows"] / victims
    return (stats["row_bytes"] + stats["optimizer_bytes_per_row"]) * rows_per_victim / 2**20


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--victims", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="victim counts the engine is timed at, e.g. 64 256 1024")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--attack", default="ig", choices=["ig", "idlg"],
                        help="engine preset; the loop runs the same recipe")
    parser.add_argument("--iterations", type=int, default=20, help="attack iterations (an L-BFGS one is 20 updates)")
    parser.add_argument("--loop-victims", type=int, default=4, help="victims the (slow) loop is timed on")
    common.add_device(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's batched row loss")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    shape, classes = (3, 32, 32), 10
    settings = TrainingSettings(lr=0.1)
    model = build_model(args.model, 3, 32, classes, init="paper" if args.model == "lenet" else "default").to(device)
    counts = sorted(set(args.victims))
    before, updates = synthetic_updates(args.model, model, max(counts), shape, classes, settings, device)
    attack = get_attack(args.attack, restarts=1)

    def run_engine(count, iterations, stats=None):
        return invert(model, before, updates[:count], settings, attack, image_shape=shape, num_classes=classes,
                      iterations=iterations, device=device, compile=args.compile, stats=stats)

    # warm-up both paths once (allocator, kernels); with --compile, compiling happens per victim count
    # (static shapes), in a 1-iteration call timed apart
    loop_attack(model, before, updates[0], settings, 1, shape, classes, device, args.attack)
    run_engine(2, 1)
    compile_seconds = {count: measure(partial(run_engine, count, 1), device) for count in counts} \
        if args.compile else None

    loop_seconds = measure(lambda: [loop_attack(model, before, u, settings, args.iterations, shape, classes, device,
                                                args.attack) for u in updates[: args.loop_victims]], device)
    loop_rate = args.loop_victims * args.iterations / loop_seconds
    rows = [{"engine": "loop", "victims": args.loop_victims, "victim_iterations_per_s": loop_rate}]
    for count in counts:
        stats = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        seconds = measure(partial(run_engine, count, args.iterations, stats), device)
        row = {"engine": "vectorised", "victims": count, "victim_iterations_per_s": count * args.iterations / seconds,
               "seconds": seconds, "estimated_mib_per_victim": engine_memory_per_victim(stats, count),
               "rows_per_chunk": stats["rows_per_chunk"], "row_mib": stats["row_bytes"] / 2**20,
               "optimizer_mib_per_row": stats["optimizer_bytes_per_row"] / 2**20,
               "evaluations_per_update": stats["row_evaluations"] / (stats["rows"] * args.iterations
                                                                      * attack.updates_per_iteration)}
        if device.type == "cuda":
            row["peak_mib_per_victim"] = (torch.cuda.max_memory_allocated() - base) / count / 2**20
        rows.append(row)
    best = rows[-1]["victim_iterations_per_s"]
    result = {
        "date": date.today().isoformat(), "device": str(device),
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda"
                    else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model, "attack": attack.name,
        "iterations": args.iterations, "compile": args.compile, "compile_seconds": compile_seconds,
        "loop_victim_iterations_per_s": loop_rate, "rows": rows, "speedup": best / loop_rate,
    }
    memory_label = "peak MiB/v" if device.type == "cuda" else "est. MiB/v"
    print(f"{'engine':<12}{'victims':>8}{'victim-it/s':>14}{'x loop':>9}{memory_label:>12}")
    for row in rows:
        memory = row.get("peak_mib_per_victim", row.get("estimated_mib_per_victim"))
        print(f"{row['engine']:<12}{row['victims']:>8}{row['victim_iterations_per_s']:>14.1f}"
              f"{row['victim_iterations_per_s'] / loop_rate:>9.1f}{'' if memory is None else f'{memory:>12.2f}'}")
    last = rows[-1]
    print(f"per row: loss and gradient {last['row_mib']:.2f} MiB, "
          f"optimiser state {last['optimizer_mib_per_row']:.2f} MiB"
          f" ({attack.optimizer}{f', history {attack.history}' if attack.optimizer == 'lbfgs' else ''}); "
          f"{last['rows_per_chunk']} rows fit in a chunk; {last['evaluations_per_update']:.2f} loss evaluations "
          f"per row and update (the loop: 1 for Adam, about 1 for torch's L-BFGS without line search)")
    if compile_seconds is not None:
        print("compile (1-iteration call per victim count, not in the rates above): "
              + ", ".join(f"{count} victims {seconds:.1f} s" for count, seconds in compile_seconds.items()))
    print(f"speedup at {rows[-1]['victims']} victims: {result['speedup']:.1f}x ({args.model}, {attack.name}, {device})")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
