"""The exact batch attacks (spear, cocktail) beside ig on the same held-out CIFAR-10 victims, and SPEAR's budget.

Every cell is one `fl-sim attack` run (the victims are drawn from the seed, so every attack of a cell sees the
same images, trained by the clients' own code from the untrained model of that seed). Parts:

- `grid`: mlp, FedSGD, one client per victim, B = 8, 16, 24, 64, 256, and 4 clients x 16 through
  `--defense secagg-emulated` (one victim: their mean update); spear, cocktail and ig;
- `cnn`: spear on cnn, FedSGD, B = 8 (images inverted from the recovered features), and the features'
  relative error against the truth, computed here by the same attacker.spear on the same gradients;
- `steps`: spear on mlp with K local steps of B (the update sums K gradients: rank K x B);
- `seeds`: spear at B = 8, 16 and 24 and ig at B = 8 and 16, SEED_VICTIMS victims per seed, with each seed's
  failures: the share over many batches, where `grid` has two per seed;
- `budget`: attacker.spear alone, one victim per call, at b = 16, 24, 32: the samples each victim's search
  took, so the share recovered at any budget up to --max-budget reads off one run (the draws of a smaller
  budget are a prefix of a larger one's).

It prints markdown tables (share of images at >= 20 / 30 / 40 dB after optimal matching, failed victims counted
as not recovered; PSNR median; seconds per victim) and plots the share against the batch size:

    OMP_NUM_THREADS=1 python benchmarks/exact_batch.py --seeds 0 1 2 --ig-iterations 200 --out out/exact-batch

Runs already in --out are read back, not redone.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fl_sim.commands.attack import victim_indices
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.results.outputs import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
GRID = [(8, 2), (16, 2), (24, 2), (64, 1), (256, 1)]  # (B, victims per seed)
SECAGG = (4, 16)  # clients x B behind one secure aggregate
SEED_VICTIMS = 4  # victims per seed of the `seeds` part
THRESHOLDS = (20, 30, 40)


def run_cell(args, name: str, attack: str, model: str, batch: int, victims: int, seed: int,
             extra: list[str]) -> dict:
    """One fl-sim attack run (read back when its summary exists): its summary and rows."""
    out = Path(args.out) / name / f"{attack}-seed{seed}"
    if not (out / "summary.json").exists():
        command = [str(Path(sys.executable).parent / "fl-sim"), "attack", "--attack", attack, "--dataset", "cifar10",
                   "--data-root", args.data_root, "--model", model, "--batch-size", str(batch),
                   "--num-victims", str(victims), "--seed", str(seed), "--iterations", str(args.ig_iterations),
                   "--device", "cpu", "--out", str(out), "--force", *extra]
        if "--train-mode" not in extra:
            command += ["--train-mode", "fedsgd"]
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode not in (0, 3):  # 3: the attack failed for every victim, a result like any other
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return {"summary": json.loads((out / "summary.json").read_text()), "rows": read_jsonl(out / "metrics.jsonl")}


def figures(cells: list[dict]) -> dict:
    """Shares at each threshold over every image of every victim (a failed victim's images count as lost)."""
    psnrs: list[float] = []
    failed, reasons, seconds, victims = 0, set(), 0.0, 0
    for cell in cells:
        seconds += cell["summary"]["attack_seconds"]
        for row in cell["rows"]:
            victims += 1
            if row["status"] != "ok":
                failed += 1
                reasons.add(row.get("reason", ""))
                psnrs += [0.0] * len(row["true_labels"])
            else:
                psnrs += row["psnr_images"]
    return {"images": len(psnrs), "victims": victims, "failed": failed, "reasons": sorted(reasons),
            "median": statistics.median(psnrs) if psnrs else None,
            **{f"at{db}": sum(p >= db for p in psnrs) / len(psnrs) for db in THRESHOLDS},
            "seconds_per_victim": seconds / max(victims, 1)}


def grid(args) -> dict:
    table = {}
    for batch, victims in GRID:
        for attack in ("spear", "cocktail", "ig"):
            table[(attack, f"B={batch}")] = figures([run_cell(args, f"mlp-b{batch}", attack, "mlp", batch, victims,
                                                              seed, []) for seed in args.seeds])
    clients, batch = SECAGG
    for attack in ("spear", "cocktail", "ig"):
        table[(attack, f"{clients}x{batch} secagg")] = figures(
            [run_cell(args, f"mlp-secagg{clients}x{batch}", attack, "mlp", batch, clients, seed,
                      ["--defense", "secagg-emulated"]) for seed in args.seeds])
    return table


def feature_errors(seeds: list[int], batch: int, victims: int) -> list[float]:
    """spear's relative error on the cnn's classifier input features, against the truth, per image."""
    from attacker.spear import spear
    dataset = load_dataset("cifar10", None, train=True)
    public = load_dataset("cifar10", None, train=False)
    errors = []
    for seed in seeds:
        model: Any = build_model("cnn", 3, 32, 10, seed=seed)  # a ConvNet: its features and classifier
        layer = model.classifier[0]
        with torch.no_grad():
            rates = (layer(model.features(public.tensors(range(512))[0]).flatten(1)) <= 0).double().mean(0)
        for examples in victim_indices(len(dataset), victims, batch, seed):
            images, labels = dataset.tensors(examples)
            model.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            [found] = spear([layer.weight.grad], [layer.bias.grad], [(layer.weight.detach(), layer.bias.detach())],
                            off_rates=[rates], seed=seed)
            with torch.no_grad():
                truth = model.features(images).flatten(1).double()
            if found.inputs is None:
                errors += [float("inf")] * batch
                continue
            errors += (torch.cdist(truth, found.inputs).min(1).values / truth.norm(dim=1)).tolist()
    return errors


def budget_curve(args) -> dict:
    """Per b: the samples each victim's search took (None: not found within --max-budget), and its seconds."""
    from attacker.spear import spear
    path = Path(args.out) / "budget.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    dataset = load_dataset("cifar10", None, train=True)
    public = load_dataset("cifar10", None, train=False)
    for b in args.budget_batches:
        for seed in args.seeds:
            key = f"{b}/{seed}"
            if key in done:
                continue
            model: Any = build_model("mlp", 3, 32, 10, seed=seed)  # an MLP: its layers
            layer = model.layers[1]
            with torch.no_grad():
                rates = (layer(public.tensors(range(512))[0].flatten(1)) <= 0).double().mean(0)
            [examples] = victim_indices(len(dataset), 1, b, seed)
            images, labels = dataset.tensors(examples)
            F.cross_entropy(model(images), labels).backward()
            started = time.perf_counter()
            [found] = spear([layer.weight.grad], [layer.bias.grad], [(layer.weight.detach(), layer.bias.detach())],
                            off_rates=[rates], budget=args.max_budget, seed=seed, max_rank=64)
            exact = found.inputs is not None and float(
                (torch.cdist(images.flatten(1).double(), found.inputs).min(1).values /
                 images.flatten(1).double().norm(dim=1)).max()) < 1e-3
            done[key] = {"samples": found.samples if exact else None, "seconds": time.perf_counter() - started,
                         "reason": found.reason}
            path.write_text(json.dumps(done, indent=1))
    return done


def plot(table: dict, path: Path, command: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = [batch for batch, _ in GRID]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, db in zip(axes, (20, 40)):
        for attack, style in (("spear", "o-"), ("cocktail", "s-"), ("ig", "^-")):
            axis.plot(batches, [table[(attack, f"B={b}")][f"at{db}"] for b in batches], style, label=attack)
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_xlabel("batch size B (one client, FedSGD)")
        axis.set_title(f"share of images at >= {db} dB")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("share of the victims' images")
    axes[0].legend()
    figure.suptitle("Passive attacks on mlp, held-out CIFAR-10, untrained model (failed victims count as lost)",
                    fontsize=9)
    figure.text(0.5, 0.005, command, ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.04, 1, 0.95))
    figure.savefig(path, dpi=120)


def markdown(table: dict) -> str:
    lines = ["| attack | batch | victims (failed) | images | >= 20 dB | >= 30 dB | >= 40 dB | PSNR median "
             "| s per victim |", "|---|---|---|---|---|---|---|---|---|"]
    for (attack, batch), f in table.items():
        lines.append(f"| {attack} | {batch} | {f['victims']} ({f['failed']}) | {f['images']} | {f['at20']:.0%} | "
                     f"{f['at30']:.0%} | {f['at40']:.0%} | {f['median']:.1f} | {f['seconds_per_victim']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ig-iterations", type=int, default=200)
    parser.add_argument("--parts", nargs="+", default=["grid", "cnn", "steps", "budget"])
    parser.add_argument("--budget-batches", type=int, nargs="+", default=[16, 24, 32])
    parser.add_argument("--max-budget", type=int, default=262_144)
    parser.add_argument("--data-root", default=os.environ.get("FL_SIM_DATA", "data"))
    parser.add_argument("--out", default="out/exact-batch")
    parser.add_argument("--plot", default="docs/exact-batch-share.png")
    args = parser.parse_args()
    os.environ.setdefault("FL_SIM_DATA", args.data_root)
    command = "OMP_NUM_THREADS=1 python benchmarks/exact_batch.py " + " ".join(sys.argv[1:])
    if "grid" in args.parts:
        table = grid(args)
        print("## mlp, FedSGD, held-out CIFAR-10 victims (seeds " + ", ".join(map(str, args.seeds)) +
              f"; ig: {args.ig_iterations} iterations)\n")
        print(markdown(table))
        for key, f in table.items():
            if f["reasons"]:
                print(f"- {key[0]} {key[1]} failed: {'; '.join(f['reasons'])}")
        plot(table, ROOT / args.plot, command)
        print(f"\nplot: {args.plot}\n")
    if "seeds" in args.parts:
        table = {}
        for batch, attacks in ((8, ("spear", "ig")), (16, ("spear", "ig")), (24, ("spear",))):
            for attack in attacks:
                cells = [run_cell(args, f"seeds-b{batch}", attack, "mlp", batch, SEED_VICTIMS, seed, [])
                         for seed in args.seeds]
                table[(attack, f"B={batch}")] = figures(cells)
                failed = {seed: sum(row["status"] != "ok" for row in cell["rows"])
                          for seed, cell in zip(args.seeds, cells)}
                table[(attack, f"B={batch}")]["per_seed"] = failed
        print(f"## mlp, FedSGD, {SEED_VICTIMS} held-out CIFAR-10 victims per seed (seeds "
              + ", ".join(map(str, args.seeds)) + f"; ig: {args.ig_iterations} iterations)\n")
        print(markdown(table))
        for (attack, batch), f in table.items():
            print(f"- {attack} {batch}: failed victims per seed {f['per_seed']}"
                  + (f"; {'; '.join(f['reasons'])}" if f["reasons"] else ""))
    if "cnn" in args.parts:
        cells = [run_cell(args, "cnn-b8", "spear", "cnn", 8, 2, seed, []) for seed in args.seeds]
        errors = feature_errors(args.seeds, 8, 2)
        table = {("spear (cnn)", "B=8"): figures(cells)}
        print(f"## cnn, FedSGD, B = 8: spear's features, inverted by {args.ig_iterations} Adam steps\n")
        print(markdown(table))
        print(f"\nfeature relative error: median {statistics.median(errors):.2e}, worst {max(errors):.2e} "
              f"({len(errors)} images)\n")
    if "steps" in args.parts:
        table = {("spear", f"K={k} x B={b}"): figures([run_cell(args, f"mlp-k{k}-b{b}", "spear", "mlp", b, 2, seed,
                                                               ["--train-mode", "steps", "--local-steps", str(k)])
                                                      for seed in args.seeds])
                 for k, b in ((2, 4), (4, 2))}
        print("## spear on K local steps (steps mode, lr 0.1 default)\n")
        print(markdown(table))
    if "budget" in args.parts:
        done = budget_curve(args)
        print(f"\n## SPEAR's sampling budget vs success (one victim per seed, seeds {args.seeds})\n")
        budgets = [2 ** p for p in range(13, 40) if 2 ** p <= args.max_budget]
        print("| b | " + " | ".join(f"{n:,}" for n in budgets) + " | s per victim (median) |")
        print("|---|" + "---|" * (len(budgets) + 1))
        for b in args.budget_batches:
            runs = [done[f"{b}/{seed}"] for seed in args.seeds]
            shares = [sum(r["samples"] is not None and r["samples"] <= n for r in runs) / len(runs) for n in budgets]
            print(f"| {b} | " + " | ".join(f"{s:.0%}" for s in shares) +
                  f" | {statistics.median(r['seconds'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
