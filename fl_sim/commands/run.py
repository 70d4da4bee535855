"""`fl-sim run`: a Flower simulation whose server inverts every client's update, round after round.

Runs the ServerApp and the ClientApp of this project with Flower's simulation engine (Ray) in this
process, the same apps `flwr run .` runs, and writes the same outputs: OUT/run.json, global.jsonl,
metrics.jsonl, round-RRR/client-CCC/{truth,reconstruction}.png and gallery.html. `--resume OUT`
continues a run that was stopped, with the config it was started with (OUT/run.json).
"""
import argparse
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fl_sim.commands import config, guard
from fl_sim.contract.attacks import TRAP_EVERYONE, trap_starves
from fl_sim.contract.run_config import DECLARED, FIELD_TYPES, RunConfig, flower_key
from fl_sim.contract.setting import ConfigError, Group
from fl_sim.results.outputs import JSONL_LOCK
from fl_sim.results.preflight import check_run
from fl_sim.results.rows import read_global, read_metrics
from fl_sim.results.summary import RECOVERED_DB, recovered_key, summarise, update_counts
from fl_sim.server import lock

if TYPE_CHECKING:  # flwr is imported only once a run starts
    from fl_sim.server.flower_private import BackendConfig

DEFAULTS = RunConfig()
FIELD_NAMES = frozenset(FIELD_TYPES)  # every run setting's name: its flag's argparse dest
# Where and with what a run computes, not what it computes: a resumed run may change these (Setting.resumable).
RESUMABLE_ELSEWHERE = tuple(name for name, declared in DECLARED.items() if declared.resumable)
RUN_SIMULATION_DEPRECATED = "`run_simulation` function is deprecated"  # Flower 1.41 warns so on every call


class HideRunSimulationDeprecation(logging.Filter):
    """Drops Flower's one "DEPRECATED FEATURE: run_simulation" line. Flower 1.41 has no other in-process
    simulation (`flwr run` needs a SuperLink), so `fl-sim run` must call it; docs/usage.md says so once, instead of
    every run warning. Every other Flower message, deprecations included, still passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return RUN_SIMULATION_DEPRECATED not in record.getMessage()


class HideInterruptedActorErrors(logging.Filter):
    """Drops Flower's ERROR records once the command is stopping. Ctrl-C in a terminal signals the whole foreground
    process group, Ray's workers too: a client's actor dies mid-task, and Flower's simulation logs the failed
    message as ERROR lines with Ray's traceback (ActorDiedError) while fl-sim is already stopping the run. Those
    say only that the run stopped, which fl-sim's own line says with where and how to continue."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not guard.stopping()


NOTHING_WORKED = 3  # the exit code of a run in which no round aggregated anything or no attack succeeded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_task_arguments(parser, out_required=False, defaults=DEFAULTS)
    fed = parser.add_argument_group(Group.FEDERATION.value)
    config.add_settings(fed, Group.FEDERATION, DEFAULTS)
    fed.add_argument("--client-cpus", type=float, default=1.0, help="CPU cores Ray reserves per client")
    fed.add_argument("--client-gpus", type=float, default=0.0, help="GPU share Ray reserves per client")
    fed.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or None, metavar="ADDR",
                     help="attach the simulation to this running Ray cluster (e.g. 10.0.0.5:6379, or 'auto' for "
                          "the one started on this machine) instead of starting Ray in this process; default "
                          "$RAY_ADDRESS; docs/deployment.md says how to spread a run over machines")
    secagg = parser.add_argument_group(Group.SECAGG.value)
    config.add_settings(secagg, Group.SECAGG, DEFAULTS)
    reliability = parser.add_argument_group(Group.FAULTS.value)
    config.add_settings(reliability, Group.FAULTS, DEFAULTS)
    reliability.add_argument("--resume", metavar="OUT",
                             help="continue the stopped run in OUT after its last finished round, with its config "
                                  "(OUT/run.json); other flags must agree with it, except --data-root, --device, "
                                  "--attack-async, --client-cpus and --client-gpus")


def check(args) -> RunConfig:
    """The run's config, checked with its data before Ray starts (bad flags cost no simulation)."""
    from fl_sim.learning.data import (  # imported late: torch is slow to import
        cached_dataset,
        check_images,
        resolve_data_root,
    )

    if (args.out is None) == (args.resume is None):
        raise ConfigError("give --out for a new run, or --resume OUT to continue one (not both)")
    if args.resume is None:
        guard.check_new_folder(args.out, "run", "run.json")
    run_config = resumed_config(args) if args.resume else config_from_flags(args)
    # run.json keeps the data root absolute: a resume from another folder finds the same data
    run_config = dataclasses.replace(run_config, data_root=str(resolve_data_root(run_config.data_root).resolve()))
    check_run(run_config)
    address = ray_address(args)
    if address is None:  # on a cluster the clients' cores and GPUs are the cluster's, not this machine's
        check_machine(run_config, args.client_cpus, args.client_gpus)
    else:
        typed = "ray_address" in getattr(args, "given_flags", ("ray_address",))
        guard.check_ray_address(address, "--ray-address" if typed else "RAY_ADDRESS")
        guard.check_device(run_config.device)
    guard.check_outside_data(run_config.out, run_config.data_root, "--resume" if args.resume else "--out")
    for train in (True, False):  # DataNotFoundError says what to do; a damaged image file is named now
        check_images(cached_dataset(run_config.dataset, run_config.data_root, train))
    check_model(run_config, args.client_cpus)
    return run_config


def check_machine(run_config: RunConfig, client_cpus: float, client_gpus: float) -> None:
    """What the run asks of the machine that it does not have (cores, GPUs, CUDA), refused before Ray starts."""
    guard.check_client_resources(client_cpus, client_gpus)
    guard.check_device(run_config.device)


def check_model(run_config: RunConfig, client_cpus: float = 1.0) -> None:
    """The model fits the machine's free memory with every client's reply, and --init holds its weights."""
    from fl_sim.learning.data import cached_dataset, image_spec
    from fl_sim.learning.models import build_model

    shape, classes = image_spec(cached_dataset(run_config.dataset, run_config.data_root, False))
    copy_bytes = guard.model_bytes(run_config.model, shape, classes, run_config.imprint_rows)
    # a round's replies come from the clients Flower samples (--fraction-train), not the whole population
    sampled = max(1, math.ceil(run_config.fraction_train * run_config.num_clients))
    workers = min(sampled, max(1, int(guard.cpu_cores() // client_cpus)))
    if run_config.imprint_rows and not run_config.imprint_bins:  # sized for the round: its clients and images
        lower = "--num-clients, --fraction-train or the images a client trains on (the imprint rows grow with them)"
    else:
        lower = ("--imprint-bins" if run_config.imprint_rows
                 else "--num-clients or --client-cpus, or use a smaller --model")
    need = guard.check_memory(copy_bytes, sampled, workers, lower, summed=run_config.defense.protocol)
    guard.say_memory("run", need)
    if run_config.init not in ("default", "paper"):  # a file that is no checkpoint of this model: said now
        build_model(run_config.model, shape[0], shape[1], classes, init=run_config.init, seed=run_config.seed)


def config_from_flags(args, names=None) -> RunConfig:
    """The RunConfig the flags `names` (default: every run setting among them) of a parsed command line give."""
    values = {name: value for name, value in vars(args).items() if name in FIELD_NAMES}
    return RunConfig.from_values({name: values[name] for name in (values if names is None else names)})


def resumed_config(args) -> RunConfig:
    """The config OUT/run.json holds, writing to OUT; a flag given that differs from it is an error.

    Only the flags the user typed count (`given_flags`, set by fl_sim.commands.cli): a flag typed with its default
    value still has to agree with the run.
    """
    out = Path(args.resume)
    try:
        stored = json.loads((out / "run.json").read_text())["config"]
    except FileNotFoundError:
        raise ConfigError(f"--resume {str(out)!r}: no run.json there, so no run to continue") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"--resume {str(out)!r}: run.json cannot be read ({error})") from None
    run_config = RunConfig.from_flower({key: value for key, value in stored.items() if key != "out-dir"})
    typed = set(args.given_flags if hasattr(args, "given_flags") else changed_from_defaults(args))
    typed = (typed & FIELD_NAMES) - {"out"}
    given = config_from_flags(args, typed)
    changes = {}
    for name in sorted(typed):
        value = getattr(given, name)
        if name in RESUMABLE_ELSEWHERE:
            changes[name] = value
        elif value != getattr(run_config, name):
            key = flower_key(name)
            raise ConfigError(f"--resume: --{name.replace('_', '-')} {given.to_flower()[key]!r} conflicts "
                              f"with the run's {run_config.to_flower()[key]!r} (run.json); leave it out "
                              f"to continue the run, or start a new one with --out")
    return dataclasses.replace(run_config, out=str(out), **changes)


def changed_from_defaults(args) -> set[str]:
    """The flags whose value differs from the default: the best guess when the command line is unknown."""
    defaults = vars(default_arguments())
    return {name for name, value in vars(args).items() if name in defaults and value != defaults[name]}


def default_arguments() -> argparse.Namespace:
    """What `fl-sim run` would get with no flags."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([])


def run(args, continue_with: str | None = None) -> dict:
    """Runs (or continues) the simulation; returns its summary numbers.

    Holds OUT's lock (fl_sim/server/lock.py) while it writes. SIGINT or SIGTERM stop it within seconds: the
    rounds committed stay, Ray is shut down, and `guard.Interrupted` goes on with where it stopped and how to
    continue (`continue_with`, default: fl-sim run --resume OUT).
    """
    run_config = check(args)
    resume = args.resume is not None
    if resume and finished(run_config):
        return {**summary(run_config.out, 0.0), "attack": run_config.attack,
                "attack_clients": run_config.attack_clients, "finished_before": True}
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline by default; set it to 1 to allow Flower's
    from flwr.simulation import run_simulation  # imported late: it is slow, and flags are checked first

    from clients.app import make_client_app  # the one place fl_sim imports clients: a simulation runs both sides
    from fl_sim.server import resume as commits
    from fl_sim.server.server_app import make_server_app, preflight

    preflight(run_config, resume)
    out = Path(run_config.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    commits.STOPPED.clear()
    started = time.perf_counter()
    hide, quiet = HideRunSimulationDeprecation(), HideInterruptedActorErrors()
    logging.getLogger("flwr").addFilter(hide)
    logging.getLogger("flwr").addFilter(quiet)  # kept after an interrupt: Flower's threads log till the process ends
    try:
        with lock.hold(out):
            try:
                run_simulation(server_app=make_server_app(run_config, resume), client_app=make_client_app(run_config),
                               num_supernodes=run_config.num_clients,
                               backend_config=backend_config(args))
            except SystemExit as error:  # Ray's own SIGTERM handler, once Ray runs
                interrupt = guard.as_interrupt(error)
                if interrupt is None:
                    raise
                raise interrupt from None
            except RuntimeError as error:  # Flower's "Simulation Runtime crashed", caused by ray.init's refusal
                address = ray_address(args)
                if address is None or not ray_refused(error):
                    raise
                raise ConfigError(f"--ray-address {address}: Ray could not join a cluster there ("
                                  f"{ray_refused(error)}): start one with `ray start --head`, or leave "
                                  f"--ray-address (and RAY_ADDRESS) out to run Ray in this process") from None
    except guard.Interrupted as interrupt:
        stop_interrupted(out, interrupt, continue_with or f"fl-sim run --resume {out}")
        raise
    finally:
        logging.getLogger("flwr").removeFilter(hide)
        if not guard.stopping():
            logging.getLogger("flwr").removeFilter(quiet)
        if created and out.is_dir() and not any(out.iterdir()):  # nothing written: no empty folder left
            out.rmdir()
    return {**summary(run_config.out, time.perf_counter() - started), "attack": run_config.attack,
            "attack_clients": run_config.attack_clients}


def ray_address(args) -> str | None:
    """The running Ray cluster the simulation attaches to (--ray-address, default $RAY_ADDRESS), or None."""
    return getattr(args, "ray_address", None) or None


def ray_refused(error: BaseException) -> str | None:
    """The ConnectionError of `ray.init` among an exception's causes (what Ray said), or None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConnectionError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def backend_config(args) -> "BackendConfig":
    """Flower's simulation backend: each client's Ray resources, and with --ray-address the cluster `ray.init`
    attaches to (its `address`) instead of starting Ray in this process."""
    config: BackendConfig = {"client_resources": {"num_cpus": args.client_cpus, "num_gpus": args.client_gpus}}
    address = ray_address(args)
    if address is not None:
        config["init_args"] = {"address": address}
    return config


def finished(run_config: RunConfig) -> bool:
    """Whether the run in OUT has finished every round (a resume has nothing to do)."""
    from fl_sim.server.resume import load_checkpoint

    record = json.loads((Path(run_config.out) / "run.json").read_text())
    checkpoint = load_checkpoint(run_config.out)
    return bool(record.get("finished")) and checkpoint is not None and checkpoint.server_round >= run_config.rounds


def stop_interrupted(out: Path, interrupt: guard.Interrupted, continue_with: str) -> None:
    """Freezes an interrupted run where it stands and stops Ray; says where in `interrupt.detail`.

    No round is committed after the one it names (the server thread may still be waiting for clients), no
    row is being written when the process ends (JSONL_LOCK stays held), and a resume goes on from there.
    """
    from fl_sim.server.resume import freeze_commits

    interrupt.end_process = True
    try:
        done = freeze_commits(out)
    except ConfigError:
        done = 0
    JSONL_LOCK.acquire(timeout=30)  # held on purpose until the process ends: no row is torn by its end
    lock.release(out, every=True)  # the server thread holds it too, and will not return to let it go
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # Ray half torn down by the signal itself: its processes die with their driver
        pass
    if (out / "run.json").exists():
        where = f"after round {done}" if done else "before round 1 finished"
        interrupt.detail = f"{where}; continue with: {continue_with}"
    else:
        interrupt.detail = "before the run started; nothing was written"


def summary(out, seconds: float) -> dict:
    """What a finished run wrote, in a few numbers: its client-rounds counted by what became of them
    (`update_counts`: updates = attacked + skipped + left_out, attacked = recovered + unrecovered + failed)
    and the figures over the attacked ones."""
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    global_rows = read_global(os.path.join(out, "global.jsonl"))
    figures = summarise(rows)  # over attacked updates only; a failed attack counts as 0 dB
    return {
        "rounds": len(global_rows),
        "rounds_aggregated": sum(row.model_changed is None or bool(row.model_changed) for row in global_rows),
        **update_counts(rows),
        "images": figures["images"],
        **{recovered_key(db): figures[recovered_key(db)] for db in RECOVERED_DB},
        "psnr_median": figures["psnr_median"],
        "accuracy": global_rows[-1].accuracy if global_rows else None,
        "seconds": seconds,
    }


def headline(result: dict) -> tuple[str, str]:
    """The run's PSNR median and final global accuracy, as printed at the end of a run."""
    psnr = "n/a" if result["psnr_median"] is None else f"{result['psnr_median']:.1f} dB"
    accuracy = "n/a" if result["accuracy"] is None else f"{result['accuracy']:.2%}"
    return psnr, accuracy


def counts_line(result: dict) -> str:
    """The run's client updates, each counted once: the attacked ones (split into those with an image
    recovered, those without, and failed attacks), the skipped ones and the left-out ones."""
    low = RECOVERED_DB[0]
    return (f"{result['updates']} client update(s): {result['attacked']} attacked "
            f"({result['recovered']} with images recovered at >= {low} dB, {result['unrecovered']} without, "
            f"{result['failed']} failed), {result['skipped']} skipped (not read by the attack), "
            f"{result['left_out']} left out (faulty replies)")


def recovered_line(result: dict) -> str:
    """The field's figure: the share of the attacked updates' images recovered at each threshold."""
    if not result.get("images"):
        return "no image attacked"
    shares = ", ".join(f"{result[recovered_key(db)]:.0%} at >= {db} dB" for db in RECOVERED_DB)
    return f"images recovered: {shares} (of {result['images']})"


def failure(result: dict, attack: str, attack_clients=None) -> str | None:
    """Why a finished run counts as a failure (exit code NOTHING_WORKED), or None when something worked."""
    if result["rounds"] and not result["rounds_aggregated"]:
        hint = f" ({TRAP_EVERYONE})" if trap_starves(attack, attack_clients) else ""
        return f"no round aggregated any reply: the global model never changed{hint}"
    succeeded = result["attacked"] - result["failed"]
    if attack != "none" and not succeeded and (result["failed"] or not (result["attacked"] or result["skipped"])):
        return "no attack succeeded" if result["attacked"] else "no update was attacked (every reply was left out)"
    return None


def main(args) -> int:
    result = run(args)
    if result.get("finished_before"):
        print(f"fl-sim run: {args.resume} finished all its {result['rounds']} round(s) already; nothing to do")
        return 0
    psnr, accuracy = headline(result)
    print(f"fl-sim run: {result['rounds']} round(s), {counts_line(result)}; {recovered_line(result)}, "
          f"PSNR median {psnr}; final global accuracy {accuracy}, {result['seconds']:.1f} s "
          f"-> {args.out or args.resume}")
    problem = failure(result, result["attack"], result["attack_clients"])
    if problem:
        print(f"fl-sim run: FAILED: {problem} (exit code {NOTHING_WORKED})")
        return NOTHING_WORKED
    return 0
