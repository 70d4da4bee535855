"""fl-sim's engine beside breaching (the maintained gradient-inversion library), on the same inputs.

One command: `OMP_NUM_THREADS=1 python benchmarks/peer_breaching.py` (the project's environment; add
`--case lenet-idlg` etc. for one case). breaching 0.1.2 pins nothing useful for today's torch and drags in
a dataset stack, so it lives in its own virtual environment, `.peer-venv/` (git-ignored), which this script
makes on first use: a venv of the running interpreter that also sees the running environment's packages
(torch, torchvision, numpy, scipy; through a .pth file), with breaching, lpips and hydra-core installed
there without their dependencies, plus hydra's own small ones. The script then re-runs itself inside it.

Each case builds one model, draws real images, has each victim take one SGD step (FedSGD: the update is
-lr x the gradient, so breaching's "shared gradient" and fl-sim's weight change carry the same
information), and hands the same model, weights and update to both libraries, used as libraries (no code
copied). Both get the same iteration budget (an L-BFGS iteration is up to 20 updates in both, torch's
LBFGS default and fl-sim's `updates_per_iteration`) and one restart; each keeps its own defaults for the
rest (breaching: randn init, its TV scale, its label strategy; fl-sim: the preset). Both are scored by
fl-sim's metrics (images matched to the truth, pixels clamped to [0, 1]).
"""
import argparse
import os
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import common

ROOT = common.ROOT
PEER = ROOT / ".peer-venv"
PEER_PACKAGES = ["breaching==0.1.2", "lpips==0.1.4", "hydra-core==1.3.2", "omegaconf==2.3.0",
                 "antlr4-python3-runtime==4.9.3"]

# case: model, data set, attack, images per victim, default iterations
CASES = {
    "lenet-idlg": ("lenet", "mnist", "idlg", 1, 50),
    "lenet-dlg-b4": ("lenet", "mnist", "dlg", 4, 50),
    "resnet20-ig": ("resnet20", "cifar10", "ig", 1, 200),
}


def peer_python() -> Path:
    return PEER / "bin" / "python"


def make_peer_env() -> None:
    """The .peer-venv: breaching and its small dependencies; torch and the rest seen from this environment."""
    python = peer_python()
    if python.exists() and subprocess.run([python, "-c", "import breaching"], capture_output=True).returncode == 0:
        return
    print(f"peer_breaching: making {PEER} (breaching 0.1.2 in its own environment)", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(PEER)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "fl-sim-base.pth").write_text("\n".join(sorted(ours)) + "\n")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", *PEER_PACKAGES])
    check = subprocess.run([python, "-c", "import breaching"], capture_output=True, text=True)
    if install.returncode or check.returncode:
        sys.exit(f"peer_breaching: breaching could not be installed or imported in {PEER} "
                 f"(pip exit {install.returncode}):\n{check.stderr[-3000:]}")


def victims(case: str, count: int, data_root: str, seed: int) -> tuple:
    """The model, its global weights, and per victim (images, labels, weight change) after one SGD step."""
    import torch

    from clients.training import local_train
    from fl_sim.commands.attack import victim_indices
    from fl_sim.contract.protocol import TrainingSettings
    from fl_sim.learning.data import load_dataset
    from fl_sim.learning.models import build_model
    from fl_sim.learning.updates import weight_change, weights

    model_name, dataset_name, _, batch, _ = CASES[case]
    dataset = load_dataset(dataset_name, data_root, train=True)
    channels, size = dataset.channels, dataset.image_size
    model = build_model(model_name, channels, size, dataset.num_classes, init="default", seed=seed)
    settings = TrainingSettings(lr=0.1, local_steps=1, batch_size=batch)
    before, out = weights(model), []
    for examples in victim_indices(len(dataset), count, batch, seed):
        images, labels = dataset.tensors(examples)
        client = build_model(model_name, channels, size, dataset.num_classes, init="default")
        client.load_state_dict(before)
        local_train(client, images, labels, settings, order_seed=seed)
        out.append((images, labels, weight_change(before, weights(client))))
    torch.manual_seed(seed)
    return model, before, settings, (channels, size, size), dataset.num_classes, out


def run_fl_sim(case, model, before, settings, shape, classes, data, iterations, seed, tv=None):
    from attacker import get_attack, invert
    attack = get_attack(CASES[case][2], restarts=1, tv_weight=tv)
    started, stats = time.perf_counter(), {}
    results = invert(model, before, [update for _, _, update in data], settings, attack, image_shape=shape,
                     num_classes=classes, iterations=iterations, seed=seed, device="cpu", stats=stats)
    seconds = time.perf_counter() - started
    per_victim = stats.get("row_evaluations", 0) / len(data)  # rows are victims here (1 restart, 1 assignment)
    return [(r.images, r.labels, f"loss {r.loss:.3g}, {r.redraws} redraws, about {per_victim:.0f} loss "
             "evaluations per victim") if r.ok else None for r in results], seconds


def run_breaching(case, model, before, settings, shape, classes, data, iterations, seed, tv=None):
    """breaching's own attack on each victim in turn (it attacks one user at a time)."""
    import logging
    import warnings

    import torch
    warnings.filterwarnings("ignore", category=UserWarning)  # hydra's version_base notice
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.script in breaching's objectives
    import breaching
    from omegaconf import OmegaConf

    logging.getLogger("breaching").setLevel(logging.WARNING)
    attack = CASES[case][2]
    name = {"idlg": "deepleakage", "dlg": "deepleakage", "ig": "invertinggradients"}[attack]
    overrides = [f"optim.max_iterations={iterations}", "restarts.num_trials=1"]
    if attack == "idlg":  # DLG's optimisation with the label read off the last layer first
        overrides += ["attack_type=optimization", "label_strategy=iDLG"]
    config = breaching.get_attack_config(name, overrides=overrides)
    model = model.cpu()
    model.load_state_dict(before)
    parameters = [tensor.detach().clone() for tensor in model.parameters()]
    names = [name for name, _ in model.named_parameters()]
    metadata = OmegaConf.create(dict(shape=list(shape), modality="vision", task="classification", classes=classes))
    payload = [dict(parameters=parameters, buffers=None, metadata=metadata)]
    attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(),
                                                config, dict(dtype=torch.float, device=torch.device("cpu")))
    evaluations = 0  # loss evaluations: torch's L-BFGS stops a step() early at its tolerances

    def counting(*args, **kwargs):
        closure = compute_objective(*args, **kwargs)

        def counted():
            nonlocal evaluations
            evaluations += 1
            return closure()
        return counted

    compute_objective, attacker._compute_objective = attacker._compute_objective, counting
    out, started = [], time.perf_counter()
    for index, (images, _, update) in enumerate(data):
        evaluations = 0
        torch.manual_seed(seed + index)
        gradient = [-update[n].detach().clone() / settings.lr for n in names]
        shared = [dict(gradients=gradient, buffers=None,
                       metadata=dict(num_data_points=len(images), labels=None, local_hyperparams=None))]
        reconstruction, stats = attacker.reconstruct(payload, shared, {}, dryrun=False)
        losses = stats["Trial_0_Val"]  # breaching's objective per iteration; it stops at a non-finite one
        out.append((reconstruction["data"].detach().cpu().clamp(0, 1), reconstruction["labels"].cpu(),
                    f"ran {len(losses) + (len(losses) < iterations)} of {iterations} iterations, "
                    f"{evaluations} loss evaluations"
                    + (", stopped on a non-finite loss" if len(losses) < iterations else "")
                    + (f", loss {losses[0]:.3g} -> best {min(losses):.3g}" if losses else "")))
    return out, time.perf_counter() - started


def score(results, data):
    from fl_sim.results.metrics import score as fl_score
    rows = []
    for result, (images, labels, _) in zip(results, data):
        if result is None:
            rows.append(None)
            continue
        row = fl_score(result[0], result[1].long(), images, labels)
        rows.append((row["psnr"], row["label_acc"], result[1][row["order"]].tolist(), labels.tolist(), result[2]))
    return rows


def inside(args) -> None:
    import statistics

    import torch
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, breaching 0.1.2 from {PEER}")
    for case in args.case:
        iterations = args.iterations or CASES[case][4]
        setup = victims(case, args.victims, args.data_root, args.seed)
        print(f"\n{case}: {args.victims} victims, {iterations} iterations, 1 restart")
        for library, runner in (("fl-sim", run_fl_sim), ("breaching", run_breaching)):
            if library not in args.libraries:
                continue
            model, before, settings, shape, classes, data = setup
            results, seconds = runner(case, model, before, settings, shape, classes, data, iterations, args.seed,
                                      tv=args.fl_sim_tv)
            rows = score(results, setup[-1])
            psnrs = [row[0] for row in rows if row is not None]
            failed = sum(row is None for row in rows)
            median = f"{statistics.median(psnrs):.1f}" if psnrs else "n/a"
            worst = f"{min(psnrs):.1f}" if psnrs else "n/a"
            labels = sum(row[1] for row in rows if row is not None) / len(rows)
            print(f"  {library:9s} PSNR median {median} dB, min {worst}, failed {failed}, labels right {labels:.0%}, "
                  f"{seconds:.1f} s", flush=True)
            for i, row in enumerate(rows):
                print(f"    victim {i}: " + ("failed" if row is None else
                                             f"{row[0]:.1f} dB, labels {row[2]} (true {row[3]}), {row[4]}"))


def main() -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--victims", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=None, help="default: the case's own (50, 50, 200)")
    common.add_data_root(parser)
    common.add_seed(parser)
    parser.add_argument("--libraries", nargs="+", choices=["fl-sim", "breaching"], default=["fl-sim", "breaching"])
    parser.add_argument("--fl-sim-tv", type=float, default=None,
                        help="fl-sim's TV weight instead of the preset's "
                             "(breaching's IG uses 0.2 on about the same TV)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args)
        return
    make_peer_env()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    sys.exit(subprocess.run([peer_python(), __file__, "--inside", *sys.argv[1:]], env=env).returncode)


if __name__ == "__main__":
    main()
