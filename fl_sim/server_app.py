"""The Flower ServerApp: FedAvg run by a server that inverts every client's update.

`run_federation` wires three parts. The strategy (fl_sim/strategy.py) trains the federation as
FedAvg and inverts the updates. The global evaluation scores the model on the test split after each
round (OUT/global.jsonl), so users see it learn. The evaluation path (`Scoreboard`) re-derives each
attacked client's round examples from the seed, scores the reconstruction against them and keeps
the images (OUT/metrics.jsonl, OUT/round-RRR/client-CCC/). A real server would not have that truth;
only the scoreboard reads it, never the strategy or the engine. OUT/gallery.html is rebuilt after
every round, so a run that stops keeps every round it finished.

`app` reads its settings from Flower's run config (`flwr run .`); `fl-sim run` builds one with
`make_server_app(config)` because run_simulation passes no run config.
"""
import platform
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from attacker import Reconstruction, resolve_device

from . import config as flags
from .evaluation import score_and_save, summarise
from .federation import RunConfig, cached_dataset, evaluate_model, image_spec, settings_to_config
from .gallery import client_folder, write_gallery
from .models import build_model
from .outputs import append_jsonl, write_json
from .partition import partition_indices, round_examples
from .strategy import AttackPlan, InvertingFedAvg


class Scoreboard:
    """The evaluation path: the truth behind each attacked update, the scores, the saved images.

    Holds the training split and re-derives partitions and round examples from the seed, exactly as
    the clients do (fl_sim/partition.py); this is the ground truth no real server has.
    """

    def __init__(self, config: RunConfig):
        self.out, self.config, self.settings = Path(config.out), config, config.settings
        self.train = cached_dataset(config.dataset, config.data_root, True)
        try:
            self.partitions = partition_indices(self.train.labels, config.num_clients, config.partition,
                                                config.alpha, config.seed)
        except ValueError as error:
            raise flags.ConfigError(str(error)) from None

    def check_partitions(self) -> None:
        """Every partition must hold a round's K x B examples; said before any round runs."""
        need = self.settings.num_images
        small = {p: len(part) for p, part in enumerate(self.partitions) if len(part) < need}
        if small:
            raise flags.ConfigError(f"partitions {small} hold fewer examples than a round's K x B = {need}: "
                                    "use fewer clients, a larger --alpha or smaller K, B")

    def truth(self, server_round: int, client: int):
        examples = round_examples(self.partitions[client], self.settings.num_images, self.config.seed, client,
                                  server_round)
        return self.train.tensors(examples)

    def __call__(self, server_round: int, clients: list[int], results: list[Reconstruction], seconds: float):
        rows = []
        for client, result in zip(clients, results):
            images, labels = self.truth(server_round, client)
            row = {"round": server_round, "client": client,
                   **score_and_save(result, images, labels, self.out / client_folder(server_round, client)),
                   "seconds": seconds / len(clients), "round_attack_seconds": seconds}
            append_jsonl(self.out / "metrics.jsonl", row)
            rows.append(row)
        summary = summarise(rows)
        psnr = summary["psnr_median"]
        log(INFO, "attack round %s: %s client(s) in %.1f s, PSNR median %s dB, labels right %.0f%%, %s failed",
            server_round, len(rows), seconds, "n/a" if psnr is None else f"{psnr:.1f}",
            100 * (summary["label_acc"] or 0), summary["failed"])


class GlobalEvaluation:
    """The strategy's evaluate_fn: the global model on the whole test split after every round."""

    def __init__(self, out: Path, config: RunConfig, device: torch.device):
        self.out, self.config, self.device = out, config, device
        self.test = cached_dataset(config.dataset, config.data_root, False)
        (channels, size, _), classes = image_spec(self.test)
        self.model = build_model(config.model, channels, size, classes).to(device)
        self.started = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        scores = evaluate_model(self.model, self.test, np.arange(len(self.test)))
        if server_round > 0:  # round 0 (the initial model) is logged by Flower, not a row of the run
            append_jsonl(self.out / "global.jsonl", {"round": server_round, "accuracy": scores["accuracy"],
                                                     "loss": scores["loss"],
                                                     "elapsed_seconds": time.perf_counter() - self.started})
            write_gallery(self.out)
            log(INFO, "round %s/%s: global accuracy %.2f%%, loss %.4f", server_round, self.config.rounds,
                100 * scores["accuracy"], scores["loss"])
        return MetricRecord({"accuracy": scores["accuracy"], "loss": scores["loss"]})


def preflight(config: RunConfig) -> Scoreboard:
    """Every check of the config and its data that can fail before a round runs."""
    config.check()
    if (Path(config.out) / "run.json").exists():  # appending to another run's rows would mix the two
        raise flags.ConfigError(f"{config.out!r} already holds a run (run.json): choose another output folder")
    scoreboard = Scoreboard(config)
    scoreboard.check_partitions()
    return scoreboard


def run_federation(grid: Grid, config: RunConfig) -> None:
    """The whole run: check, set up, train `config.rounds` rounds, and record everything under config.out."""
    scoreboard = preflight(config)
    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = config.settings
    device = resolve_device(config.device)
    global_evaluation = GlobalEvaluation(out, config, device)
    (channels, size, _), classes = image_spec(global_evaluation.test)  # the server's own data, not the truth
    model = build_model(config.model, channels, size, classes, init=config.init, seed=config.seed)
    record = {"config": config.to_flower(), "seed": config.seed, "device": str(device),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions()}
    write_json(out / "run.json", record)
    wait_for_clients(grid, config.num_clients)
    attack = flags.attack_config(config) if config.attack != "none" else None
    strategy = InvertingFedAvg(
        model, attack, scoreboard, image_shape=(channels, size, size), num_classes=classes,
        iterations=config.iterations, seed=config.seed, replay=not config.no_replay, device=device, progress=True,
        plan=AttackPlan(config.attack_every, frozenset(config.attack_clients) if config.attack_clients else None),
        fraction_train=1.0, min_train_nodes=config.num_clients, min_available_nodes=config.num_clients,
        fraction_evaluate=1.0 if config.client_eval else 0.0, min_evaluate_nodes=config.num_clients)
    strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=config.rounds,
                   train_config=ConfigRecord(settings_to_config(settings)),
                   evaluate_fn=global_evaluation)
    write_json(out / "run.json", {**record, "finished": True, "seconds": time.perf_counter() - started})
    write_gallery(out)


def wait_for_clients(grid: Grid, expected: int, timeout: float = 120.0) -> None:
    """Fails fast when the federation's node count and num-clients disagree (Flower would wait forever).

    A simulation registers all its nodes at once, so the count is read once the first ones appear.
    """
    deadline = time.monotonic() + timeout
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    found = len(list(grid.get_node_ids())) if nodes else 0
    if found != expected:
        raise flags.ConfigError(
            f"the federation has {found} client node(s) but num-clients is {expected}: make them agree "
            f"(fl-sim run --num-clients, or flwr run --federation-config 'num-supernodes={expected}')")


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("fl-sim", "flwr", "torch", "numpy", "ray"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def make_server_app(defaults: RunConfig | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's (if any) over `defaults`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, RunConfig.from_flower(context.run_config, defaults))

    return app


app = make_server_app()
