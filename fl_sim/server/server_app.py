"""The Flower ServerApp: a Flower strategy (FedAvg by default) run by a server that inverts every update.

`run_federation` wires three parts. The strategy (fl_sim/server/strategy.py) wraps the Flower strategy the run
names, which trains the federation, and inverts the updates before it aggregates them. The global evaluation
scores the model on the test split after each round (OUT/global.jsonl), so users see it learn. The evaluation
path (`Scoreboard`) re-derives each attacked client's round examples from the seed, scores the reconstruction
against them and keeps the images (OUT/metrics.jsonl, OUT/round-RRR/client-CCC/). A real server would not
have that truth; only the scoreboard reads it, never the strategy or the engine. Replies the strategy left out get a
row too, with their status and reason. Each round ends with OUT/checkpoint.pt, its commit point
(fl_sim/server/resume.py): a killed run resumes after the last round it finished, with nothing doubled.

With `--attack-async` a round's attack runs on a background thread (fl_sim/server/background.py) while the next
round trains. The checkpoint then names the last round whose attack rows are on disk too: as round r
ends, `RoundEnd` waits for round r - 1's attack (it ran beside round r's training) and commits round r if
its own attack is done already, else round r - 1. When the rounds are over, and when the run fails, the
queue is drained (no attack lost) and the rounds it finished are committed, before the run's summary.

`app` reads its settings from Flower's run config (`flwr run .`); `fl-sim run` builds one with
`make_server_app(config)` because run_simulation passes no run config.
"""
import json
import platform
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from attacker import Reconstruction, resolve_device
from fl_sim.contract.attacks import NO_ATTACK, TRAP_EVERYONE, trap_starves
from fl_sim.contract.protocol import (
    DP_EPSILON,
    DP_EPSILON_ROUND,
    DP_METRICS,
    METRICS,
    PARTITION_ID,
    TrainMode,
    inspection_labels,
)
from fl_sim.contract.records import FLAGGED
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.accuracy import evaluate_model
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.models import build_model
from fl_sim.learning.partition import client_shards, training_examples
from fl_sim.learning.updates import parameter_names
from fl_sim.results.evaluation import score_and_save, summarise
from fl_sim.results.gallery import AGGREGATE, EMULATED, client_folder, write_gallery
from fl_sim.results.outputs import append_jsonl, inside, write_json
from fl_sim.results.preflight import check_run
from fl_sim.results.rows import global_row, metrics_row
from fl_sim.results.summary import EPSILON, EPSILON_ROUND
from fl_sim.server import lock
from fl_sim.server.active import public_images
from fl_sim.server.attacks import attack_context, build_attack
from fl_sim.server.background import AttackQueue
from fl_sim.server.refusal import in_flower_terms, refuse_run
from fl_sim.server.resume import Checkpoint, load_checkpoint, rewind, round_rows, save_checkpoint
from fl_sim.server.round import write_faults
from fl_sim.server.secagg import SecAggParameters, SecAggPlusFace, run_secagg
from fl_sim.server.strategy import (
    AttackPlan,
    InvertingStrategy,
    ReplyFault,
    RoundOffset,
    ServerAttack,
    Victim,
    flower_strategy,
    server_dp_caveat,
)


class Scoreboard:
    """The evaluation path: the truth behind each attacked update, the scores, the saved images.

    Holds the training split and re-derives partitions and round examples from the seed, exactly as
    the clients do (fl_sim/learning/partition.py); this is the ground truth no real server has.
    """

    def __init__(self, config: RunConfig):
        self.out, self.config, self.settings = Path(config.out), config, config.training
        self.flags: dict[tuple[int, int], list[str]] = {}  # (round, client) -> the checks its model failed
        self.train = cached_dataset(config.dataset, config.data_root, True)
        try:
            self.partitions = client_shards(self.train.labels, config.num_clients, config.partition, config.alpha,
                                            config.seed, config.min_shard, config.max_shard)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.spent: dict[int, dict[int, dict[str, float]]] = {}  # round -> client -> DP-SGD's epsilons

    def check_partitions(self) -> None:
        """Every shard must hold a round's K x B examples (steps mode); said before any round runs."""
        need = 1 if self.settings.mode == TrainMode.EPOCHS else self.settings.num_images
        small = {p: len(part) for p, part in enumerate(self.partitions) if len(part) < need}
        if small:
            raise ConfigError(f"shards {small} hold fewer examples than a round's K x B = {need}: "
                              "use fewer clients, a larger --alpha or --min-shard, or smaller K, B")

    def truth(self, server_round: int, victim: Victim):
        """A client's examples of the round (epochs mode: its shard); for a secure aggregate, all its clients'
        examples one after another."""
        parts = [self.train.tensors(training_examples(self.partitions[client], self.settings, self.config.seed,
                                                      client, server_round))
                 for client in victim.clients]
        return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])

    def record_attack(self, server_round: int, victims: list[Victim], results: list[Reconstruction],
                      update_norms: list[float], seconds: float):
        rows = []
        victims, results, update_norms, apart = each_client(victims, results, update_norms)
        for victim, result, norm, read_apart in zip(victims, results, update_norms, apart, strict=True):
            images, labels = self.truth(server_round, victim)
            named: dict[str, Any] = {"client": AGGREGATE, "clients": list(victim.clients),
                                     "secure_aggregation": EMULATED if self.config.defense.emulated else "secagg+"} \
                if victim.secure_aggregate else {"client": victim.clients[0]}
            if read_apart:
                named["through_secure_aggregate"] = True  # read apart from the sum of the round's clients
            folder = inside(self.out, client_folder(server_round, AGGREGATE if victim.secure_aggregate
                                                    else victim.clients[0]))
            flags = {client: self.flags.pop((server_round, client)) for client in victim.clients
                     if (server_round, client) in self.flags}
            if flags:  # inspect:flag: what the victims' own checks said of the model they were sent
                named["inspect_flags"] = {str(client): found for client, found in flags.items()} \
                    if victim.secure_aggregate else flags[victim.clients[0]]
            row = metrics_row(round=server_round, **named, **score_and_save(result, images, labels, folder),
                              update_norm=norm, seconds=seconds / len(victims), round_attack_seconds=seconds,
                              **self.epsilons(server_round, victim.clients))
            append_jsonl(self.out / "metrics.jsonl", row.to_json())
            rows.append(row)
        summary = summarise(rows)
        psnr = summary["psnr_median"]
        log(INFO, "attack round %s: %s client(s) in %.1f s, PSNR median %s dB, labels right %.0f%%, %s failed",
            server_round, len(rows), seconds, "n/a" if psnr is None else f"{psnr:.1f}",
            100 * (summary["label_share"] or 0), summary["failed"])

    def record_inspection(self, server_round: int, flags: dict[int, int], attacked: frozenset[int]) -> None:
        """inspect:flag: an attacked client's flags go into its attack row (`inspect_flags`, the failed checks'
        names, [] when it passed); a client not attacked that flagged its model gets a row of its own."""
        for client, mask in sorted(flags.items()):
            if client in attacked:
                self.flags[(server_round, client)] = inspection_labels(mask)
            elif mask:
                failed = inspection_labels(mask)
                append_jsonl(self.out / "metrics.jsonl", metrics_row(
                    FLAGGED, round=server_round, client=client, inspect_flags=failed,
                    reason=f"not attacked; the client flagged the model it was sent: {', '.join(failed)}").to_json())

    def record_privacy(self, server_round: int, spent: dict[int, dict[str, float]]) -> None:
        """Each client's DP-SGD epsilons of the round (its reply's), for the round's rows; logged too."""
        self.spent = {server_round: spent}  # only the round being recorded is needed
        cumulative = max(values[DP_EPSILON] for values in spent.values())
        log(INFO, "round %s: DP-SGD spent epsilon %.3g this round, %.3g in rounds 1..%s (delta %g, largest over "
            "clients)", server_round, max(values[DP_EPSILON_ROUND] for values in spent.values()), cumulative,
            server_round, self.config.defense.dpsgd.delta if self.config.defense.dpsgd else float("nan"))

    def epsilons(self, server_round: int, clients: tuple[int, ...]) -> dict[str, Any]:
        """`epsilon` (rounds 1..server_round) and `epsilon_round` of a victim (of a secure aggregate: the largest
        of its clients'), or nothing when the clients reported none."""
        spent = [self.spent.get(server_round, {}).get(client) for client in clients]
        known = [values for values in spent if values is not None]
        if not known:
            return {}
        return {EPSILON: max(values[DP_EPSILON] for values in known),
                EPSILON_ROUND: max(values[DP_EPSILON_ROUND] for values in known)}

    def record_faults(self, server_round: int, faults: list[ReplyFault]) -> None:
        """A row per client-round the strategy left out: neither attacked nor averaged."""
        write_faults(self.out / "metrics.jsonl", server_round, faults)


def each_client(victims: list[Victim], results: list[Reconstruction],
                update_norms: list[float]) -> tuple[list[Victim], list[Reconstruction], list[float], list[bool]]:
    """A secure aggregate that the attack read client by client (it named each image's client: the mosaic
    attack) as one victim per client, scored against that client's own images: a row per client. The
    aggregate's update norm stays on each of its rows (no client's own update was seen). The last list says
    which rows were read apart from an aggregate."""
    split: tuple[list[Victim], list[Reconstruction], list[float], list[bool]] = ([], [], [], [])
    for victim, result, norm in zip(victims, results, update_norms, strict=True):
        if not (victim.secure_aggregate and result.ok and result.image_clients is not None):
            split[0].append(victim)
            split[1].append(result)
            split[2].append(norm)
            split[3].append(False)
            continue
        status = result.image_status or [""] * len(result.image_clients)
        for client in victim.clients:
            mine = [i for i, owner in enumerate(result.image_clients) if owner == client]
            split[0].append(Victim((client,)))
            split[1].append(Reconstruction(result.images[mine], result.labels[mine], result.loss,
                                           image_status=[status[i] for i in mine], image_clients=[client] * len(mine)))
            split[2].append(norm)
            split[3].append(True)
    return split


class RoundEnd:
    """The strategy's evaluate_fn, run as each round ends: the global model scored on the whole test
    split (OUT/global.jsonl), the gallery rebuilt, then the round committed with OUT/checkpoint.pt.

    With `attacks` (--attack-async) a round is committed only once its attack is done as well: as round r
    ends, round r - 1's attack is waited for (an error in it is raised here), and the checkpoint names the
    last round whose training and attack are both finished (r, or r - 1 while r's attack still runs).
    `commit` writes it; the rounds not yet committed (at most two) are held in memory till then.
    """

    def __init__(self, out: Path, config: RunConfig, device: torch.device, elapsed_before: float = 0.0,
                 attacks: AttackQueue | None = None):
        self.out, self.config, self.device, self.attacks = out, config, device, attacks
        self.test = cached_dataset(config.dataset, config.data_root, False)
        (channels, size, _), classes = image_spec(self.test)
        self.model = build_model(config.model, channels, size, classes, imprint=config.imprint_rows).to(device)
        self.started = time.perf_counter() - elapsed_before
        # the weights of the round before, to tell whether a round aggregated anything
        self.previous: dict[str, torch.Tensor] | None = None
        self.uncommitted: list[Checkpoint] = []  # finished rounds whose attack may still run, oldest first

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        weights = arrays.to_torch_state_dict()
        self.model.load_state_dict(weights)
        scores = evaluate_model(self.model, self.test, np.arange(len(self.test)))
        changed = self.previous is None or any(not torch.equal(weights[name], self.previous[name]) for name in weights)
        self.previous = weights
        if server_round > 0:  # round 0 (the initial model) is logged by Flower, not a row of the run
            elapsed = time.perf_counter() - self.started
            append_jsonl(self.out / "global.jsonl", global_row(server_round, scores["accuracy"], scores["loss"],
                                                               elapsed, changed).to_json())
            self.uncommitted.append(Checkpoint(server_round, weights, elapsed))
            if self.attacks is not None:
                self.attacks.wait(server_round - 1)  # it ran beside this round's training
            write_gallery(self.out)
            self.commit()
            log(INFO, "round %s/%s: global accuracy %.2f%%, loss %.4f", server_round, self.config.rounds,
                100 * scores["accuracy"], scores["loss"])
        return MetricRecord({"accuracy": scores["accuracy"], "loss": scores["loss"]})

    def commit(self) -> None:
        """Writes OUT/checkpoint.pt for the last finished round whose attack rows are all on disk (without a
        background queue: the last finished round), if it is not committed yet."""
        ready = [checkpoint for checkpoint in self.uncommitted
                 if self.attacks is None or self.attacks.done_through(checkpoint.server_round)]
        if ready:
            save_checkpoint(self.out, ready[-1])
            self.uncommitted = [c for c in self.uncommitted if c.server_round > ready[-1].server_round]


def preflight(config: RunConfig, resume: bool = False) -> Scoreboard:
    """Every check of the config and its data that can fail before a round runs."""
    check_run(config)
    holds_run = (Path(config.out) / "run.json").exists()
    if holds_run and not resume:  # appending to another run's rows would mix the two
        raise ConfigError(f"{config.out!r} already holds a run (run.json): choose another output folder, "
                                "or continue it with --resume")
    if resume and not holds_run:
        raise ConfigError(f"{config.out!r} holds no run to resume (no run.json)")
    if resume:
        load_checkpoint(config.out)  # one that cannot be read is said now
        round_rows(config.out)  # and so is a damaged row
    scoreboard = Scoreboard(config)
    scoreboard.check_partitions()
    return scoreboard


def run_federation(grid: Grid, config: RunConfig, resume: bool = False) -> None:
    """The whole run: check, set up, train `config.rounds` rounds, and record everything under config.out.

    With `resume`, config.out holds a run that was stopped: it goes on after its last checkpoint. The run's
    folder is locked while it is written (fl_sim/server/lock.py): a second writer is refused, naming this one.
    """
    scoreboard = preflight(config, resume)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    with lock.hold(config.out):
        federate(grid, config, resume, scoreboard)


def federate(grid: Grid, config: RunConfig, resume: bool, scoreboard: "Scoreboard") -> None:
    """run_federation's rounds and records, with the run's folder locked."""
    if trap_starves(config.attack, config.attack_clients):  # under fl-sim run and flwr run alike
        log(WARNING, TRAP_EVERYONE)
    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = config.training
    device = resolve_device(config.device)
    checkpoint = load_checkpoint(out) if resume else None
    done = checkpoint.server_round if checkpoint else 0
    attacks = AttackQueue() if config.attack_async and config.attack != NO_ATTACK and done < config.rounds else None
    round_end = RoundEnd(out, config, device, checkpoint.elapsed_seconds if checkpoint else 0.0, attacks)
    (channels, size, _), classes = image_spec(round_end.test)  # the server's own data, not the truth
    model = build_model(config.model, channels, size, classes, init=config.init, seed=config.seed,
                        imprint=config.imprint_rows)
    if resume:
        for dropped in rewind(out, done):
            log(WARNING, "resume: %s", dropped)
        write_gallery(out)
        record = json.loads((out / "run.json").read_text())
        record.pop("finished", None)
        record["resumed"] = [*record.get("resumed", []), {"after_round": done, "at": now()}]
        log(INFO, "resuming %s after round %s of %s", out, done, config.rounds)
    else:
        record = {"config": config.to_flower(), "seed": config.seed, "device": str(device), "started": now(),
                  "versions": versions()}
        if config.imprint_rows:  # the block the clients build (the mosaic sizes it for the round without the flag)
            record["imprint_rows"] = config.imprint_rows
    caveat = server_dp_caveat(config)
    if caveat is not None:
        log(WARNING, caveat)
        record["server_dp"] = caveat
    write_json(out / "run.json", record)
    if done < config.rounds:
        partitions = identify_clients(grid, config.num_clients)
        attack = None if config.attack == NO_ATTACK else ServerAttack(
            build_attack(attack_context(config, model, (channels, size, size), classes, device,
                                        lambda: public_images(round_end.test, seed=config.seed), progress=True)),
            tuple(parameter_names(model)), seed=config.seed, max_images=config.max_attack_images,
            plan=AttackPlan(config.attack_every, frozenset(config.attack_clients) if config.attack_clients else None))
        strategy = InvertingStrategy(flower_strategy(config), attack, scoreboard, partitions=partitions,
                                     secure_aggregation=config.defense.secure_aggregation,
                                     max_shard=config.max_shard or len(scoreboard.train), background=attacks,
                                     reported_metrics=DP_METRICS if config.defense.dpsgd else ())
        initial = checkpoint.weights if checkpoint else model.state_dict()
        train_config = ConfigRecord(dict(settings.to_config()))
        try:
            if config.defense.protocol:  # Flower's SecAgg+, on the legacy path (fl_sim/server/secagg.py)
                face = SecAggPlusFace(strategy, strategy.round_server, grid, SecAggParameters.of(config),
                                      names=tuple(initial), initial=initial, train_config=train_config,
                                      round_end=round_end, done=done)
                run_secagg(grid, face, config.rounds - done)
            else:
                RoundOffset(strategy, done).start(grid, ArrayRecord(initial), num_rounds=config.rounds,
                                                  train_config=train_config, evaluate_fn=round_end)
        except BaseException:
            finish_attacks(attacks, round_end, raise_errors=False)  # the run's own error goes on, not a worker's
            raise
        finish_attacks(attacks, round_end)
    write_json(out / "run.json", {**record, "finished": True, "seconds": time.perf_counter() - started})
    write_gallery(out)


def finish_attacks(attacks: AttackQueue | None, round_end: RoundEnd, raise_errors: bool = True) -> None:
    """Drains the background attacks (every queued round is attacked and recorded), then commits the rounds
    they finished; with `raise_errors`, an error of theirs is raised after that."""
    if attacks is None:
        return
    if attacks.pending():
        log(INFO, "waiting for the background attacks of round(s) %s", ", ".join(map(str, attacks.pending())))
    try:
        attacks.close(raise_errors)
    finally:
        round_end.commit()


def identify_clients(grid: Grid, expected: int, timeout: float = 600.0) -> dict[int, int]:
    """node id -> partition id of every client, as each node says (error replies name no client).

    Fails with one sentence, before any round, when a node does not answer or two claim one partition.
    """
    wait_for_clients(grid, expected)
    asks = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in grid.get_node_ids()]
    partitions = {}
    for reply in grid.send_and_receive(asks, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise ConfigError(f"node {node} did not say its partition: {(reply.error.reason or '').strip()}")
        metrics = reply.content.metric_records.get(METRICS)
        partition = metrics.get(PARTITION_ID) if metrics is not None else None
        if type(partition) is not int or not 0 <= partition < expected:
            raise ConfigError(f"node {node} says it holds partition {partition!r}, not one of 0..{expected - 1}")
        partitions[node] = partition
    if sorted(partitions.values()) != list(range(expected)):
        raise ConfigError(f"the nodes hold partitions {sorted(partitions.values())}, not each of "
                                f"0..{expected - 1} once: give every SuperNode its own partition-id")
    return partitions


def wait_for_clients(grid: Grid, expected: int, timeout: float = 120.0, settle: float = 10.0) -> None:
    """Fails fast when the federation's node count and num-clients disagree (Flower would wait forever).

    A simulation registers all its nodes at once; deployed SuperNodes join one by one. So the count is
    read until it reaches num-clients, or has not grown for `settle` seconds, or `timeout` passes.
    """
    deadline = time.monotonic() + timeout
    found, changed = 0, time.monotonic()
    while time.monotonic() < deadline:
        count = len(list(grid.get_node_ids()))
        if count != found:
            found, changed = count, time.monotonic()
        if found >= expected or (found and time.monotonic() - changed > settle):
            break
        time.sleep(0.2)
    if found != expected:
        raise ConfigError(
            f"the federation has {found} client node(s) but num-clients is {expected}: make them agree "
            f"(fl-sim run --num-clients, or flwr run --federation-config 'num-supernodes={expected}')")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("fl-sim", "flwr", "torch", "numpy", "ray"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def make_server_app(defaults: RunConfig | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp whose run config is Flower's (if any) over `defaults`; `resume` goes on with a stopped run."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, RunConfig.from_flower(context.run_config, defaults), resume)
        except ConfigError as error:
            if defaults is not None:  # fl-sim run: its command line says it, in its flags' words
                raise
            refuse_run(in_flower_terms(str(error)))

    return app


app = make_server_app()
