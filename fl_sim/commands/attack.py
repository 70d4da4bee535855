"""`fl-sim attack`: one round of the attack without Flower, on victims drawn from a data set.

The round is `fl-sim run`'s own (fl_sim/server/attacks.py): the attack arms what each victim is sent
(`arm_round`; a passive attack sends the global model), each victim gets a train message holding it and
answers as a ClientApp does: the --defense's Flower mods of a ClientApp (clients/mods.py `defense_mods`:
inspection, the steps of clients/defenses.py) around local training on its own images with the real client
code (clients/training.py); `attack_round` reads the weight changes, each against what its victim was
sent; the evaluation path scores them against the truth. With `secagg` the attack gets only what Flower's
SecAgg+ would reveal of the victims' replies (their example-weighted mean, clipped and quantized as the protocol
does under the --secagg-* settings: fl_sim/server/secagg.py `protocol_aggregate`; no network, so no masks and no
dropouts), with `secagg-emulated` their plain mean update; either is read as one victim holding all their
images. Unlike `fl-sim run`, no update is too large to read.

--out must be new or empty, so a folder never mixes two runs' victims; --force clears it first (only
if it holds nothing but what fl-sim attack or a sweep point writes).

With `--defense inspect` each victim's `InspectMod` first checks what it was sent (clients/inspection.py; one
round, so against the announced architecture and the weights' own statistics, with no earlier model to compare):
a victim that refuses sends nothing (its row: status `refused`, and its refusal), one that flags
(`inspect:flag`) trains all the same and its row says `inspect_flags`.

With an active attack (`--attack imprint|trap`) the server is malicious (fl_sim/server/active.py): the victims
train the weights it armed (with the imprint, the architecture holds the imprint block), and the analytic
attack reads their images off the updates (attacker/analytic.py).
"""
import argparse
import re
import shutil
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from attacker import resolve_device
from clients.context import node_partition
from clients.defenses import defense_seed
from clients.mods import chained, defense_mods
from clients.privacy import DP_STREAM, spent
from clients.training import local_train
from fl_sim.commands import config, guard
from fl_sim.contract.attacks import NO_ATTACK, attack_names
from fl_sim.contract.protocol import ARRAYS, CONFIG, INSPECT_FLAGS, METRICS, SERVER_ROUND, inspection_labels
from fl_sim.contract.records import ReplyStatus
from fl_sim.contract.setting import Group
from fl_sim.learning.data import check_images, load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import Weights, parameter_names, weight_change, weights
from fl_sim.results.evaluation import score_and_save, summarise
from fl_sim.results.outputs import rewrite_jsonl, write_json
from fl_sim.results.rows import metrics_row
from fl_sim.results.summary import EPSILON, EPSILON_ROUND, RECOVERED_DB, recovered_key
from fl_sim.server.active import public_images
from fl_sim.server.attacks import arm_round, attack_context, attack_round, build_attack
from fl_sim.server.flower_private import as_message_task
from fl_sim.server.secagg import SecAggParameters, protocol_aggregate, revealed_update

ALL_FAILED = 3  # exit status when no victim's attack succeeded
EPILOG = (f"Exit status: 0 when at least one victim was reconstructed (however badly), 2 on bad input, "
          f"{ALL_FAILED} when the attack failed for every victim (diverged or error; see metrics.jsonl).")
# What fl-sim attack (and a sweep point around it) writes into --out: all --force may delete.
OWN_FILES = re.compile(r"(summary\.json|metrics\.jsonl|point\.json|victim-\d{3,}|\..+\.tmp)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_task_arguments(parser)
    config.add_settings(parser.add_argument_group(Group.SECAGG.value), Group.SECAGG, config.TASK_DEFAULTS)
    parser.add_argument("--num-victims", type=int, default=8, help="victims (clients) to attack")
    parser.add_argument("--shard-size", type=int, default=32,
                        help="--train-mode epochs: the examples each victim holds and trains on (default 32)")
    parser.add_argument("--victims-at-once", type=int, default=None,
                        help="cap on victims optimised together (default all; 1 = one at a time, as other tools do)")
    parser.add_argument("--force", action="store_true",
                        help="clear a non-empty --out first (refused when it holds files fl-sim attack did not write)")
    parser.epilog = EPILOG


def check(args) -> None:
    config.check_task_arguments(args)
    if args.shard_size < 1:
        raise config.ConfigError(f"--shard-size must be at least 1, got {args.shard_size}")
    if args.train_mode == "epochs" and config.defense(args).secure_aggregation:
        raise config.ConfigError("--defense secagg is attacked in fedsgd or steps mode: the mean of epochs-mode "
                                 "updates has no single training to replay")
    if config.defense(args).local_dp is not None:
        raise config.ConfigError("--defense ldp runs Flower's LocalDpMod, whose noise is unseeded, so fl-sim attack "
                                 "could not repeat it: use fl-sim run (or fl-sim sweep --mode run)")
    if args.attack == NO_ATTACK:
        raise config.ConfigError(f"fl-sim attack needs an attack: choose one of {', '.join(attack_names())}")
    if args.num_victims < 1:
        raise config.ConfigError(f"--num-victims must be at least 1, got {args.num_victims}")
    if args.victims_at_once is not None and args.victims_at_once < 1:
        raise config.ConfigError(f"--victims-at-once must be at least 1, got {args.victims_at_once}")
    check_out(Path(args.out), getattr(args, "force", False))
    guard.check_outside_data(args.out, args.data_root)
    guard.check_device(args.device)


def check_out(out: Path, force: bool) -> None:
    """--out must be new or empty: an earlier run's victim folders would be taken for this run's.
    With `force` it may hold fl-sim attack's own outputs (cleared by `clear_out`), nothing else."""
    if out.exists() and not out.is_dir():
        raise config.ConfigError(f"--out {str(out)!r} is a file, not a folder")
    entries = sorted(path.name for path in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not force:
        raise config.ConfigError(f"--out {str(out)!r} is not empty (it holds {', '.join(entries[:3])}"
                                 f"{', ...' if len(entries) > 3 else ''}): choose a new folder, or add --force to "
                                 "clear it")
    foreign = [name for name in entries if not OWN_FILES.fullmatch(name)]
    if foreign:
        raise config.ConfigError(f"--out {str(out)!r} holds {', '.join(foreign[:3])}, which fl-sim attack did not "
                                 "write: --force clears only its own outputs; choose a new folder")


def clear_out(out: Path) -> None:
    """Empties --out of fl-sim attack's own outputs (check_out has refused anything else)."""
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        if OWN_FILES.fullmatch(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def victim_indices(dataset_size: int, victims: int, per_victim: int, seed: int) -> np.ndarray:
    """Distinct examples for every victim, drawn from the seed: (victims, per_victim)."""
    if victims * per_victim > dataset_size:
        raise config.ConfigError(
            f"{victims} victims x {per_victim} images need {victims * per_victim} examples; the data set has "
            f"{dataset_size}")
    rng = np.random.default_rng(seed)
    return rng.choice(dataset_size, size=victims * per_victim, replace=False).reshape(victims, per_victim)


def run(args) -> dict:
    started = time.perf_counter()
    check(args)
    dataset = load_dataset(args.dataset, args.data_root, train=True)
    check_images(dataset)  # a damaged image file is named before any victim trains
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    run_config = config.task_config(args)
    imprint_rows = run_config.imprint_rows
    need = guard.check_memory(guard.model_bytes(args.model, shape, dataset.num_classes, imprint_rows),
                              args.num_victims, 1, "--imprint-bins" if imprint_rows else "--num-victims", "victim(s)",
                              ray=False)  # before --force clears
    guard.say_memory("attack", need)
    clear_out(Path(args.out))
    settings = config.training_settings(args)
    defense = config.defense(args)
    device = resolve_device(args.device)
    model = build_model(args.model, *shape[:2], dataset.num_classes, init=args.init, seed=args.seed,
                        imprint=imprint_rows)
    global_weights = weights(model)
    attack = build_attack(attack_context(  # the malicious server calibrates on its own (test) split
        run_config, model, shape, dataset.num_classes, device,
        lambda: public_images(load_dataset(args.dataset, args.data_root, train=False), seed=args.seed),
        progress=True, victims_at_once=args.victims_at_once))
    victims = range(args.num_victims)
    armed = arm_round(attack, global_weights, settings, args.num_victims, victims, defense.secure_aggregation)
    sent_to: dict[int, Weights] = {victim: armed.weights[victim] if armed and victim in armed.weights
                                   else global_weights for victim in victims}
    narrow = armed.narrow if armed else {}  # tensors the attack sends in a narrower dtype (Armed.narrow)

    def narrowed(sent: Weights) -> Weights:
        return {name: tensor.to(narrow.get(name, tensor.dtype)) for name, tensor in sent.items()}

    parameters = parameter_names(model)
    indices = victim_indices(len(dataset), args.num_victims, settings.num_images, args.seed)

    def train(msg: Message, context: Context) -> Message:
        """A victim's local training on its own images, as the ClientApp's train replies (the defense's mods
        around it)."""
        victim, _ = node_partition(context)
        images, labels = dataset.tensors(indices[victim])
        client = build_model(args.model, *shape[:2], dataset.num_classes, init="default", imprint=imprint_rows)
        client.load_state_dict(msg.content.array_records[ARRAYS].to_torch_state_dict())
        local_train(client, images, labels, settings, order_seed=defense_seed(args.seed, victim, 1),
                    dp=defense.dpsgd, noise_seed=defense_seed(args.seed, victim, 1, DP_STREAM))
        return Message(RecordDict({ARRAYS: ArrayRecord(weights(client)), METRICS: MetricRecord({})}), reply_to=msg)

    # the victim side of a ClientApp: --defense's mods (inspection, the steps), each victim's steps seeded by
    # (seed, victim) as this one round has always drawn them
    client_side = chained(defense_mods(run_config, seed_of=lambda seed, victim, _: defense_seed(seed, victim)),
                          train)
    round_config = ConfigRecord({**settings.to_config(), SERVER_ROUND: 1})
    updates, truth, replies, refused, flags = {}, [], [], {}, {}
    with as_message_task():
        for victim, examples in enumerate(indices):
            context = Context(run_id=1, node_id=victim, node_config={"partition-id": victim,
                                                                       "num-partitions": args.num_victims},
                              state=RecordDict(), run_config={})
            sent_record = ArrayRecord(narrowed(sent_to[victim]))
            reply = client_side(Message(RecordDict({ARRAYS: sent_record, CONFIG: round_config}),
                                        dst_node_id=victim, message_type=MessageType.TRAIN), context)
            if reply.has_error():  # --defense inspect: the victim refused what it was sent
                refused[victim] = reply.error.reason or ""
                continue
            mask = reply.content.metric_records[METRICS].get(INSPECT_FLAGS)
            flags[victim] = inspection_labels(int(cast(int, mask))) if mask is not None else []
            sent = reply.content.array_records[ARRAYS].to_torch_state_dict()
            updates[victim] = weight_change(sent_to[victim], sent)
            truth.append(dataset.tensors(examples))
            if defense.protocol:
                replies.append(sent)
    if defense.secure_aggregation and truth:  # the server learns only the mean update: one victim with every image
        truth = [(torch.cat([images for images, _ in truth]), torch.cat([labels for _, labels in truth]))]
    counts = {victim: len(examples) for victim, examples in enumerate(indices) if victim in updates}
    revealed = None
    if defense.protocol and updates:  # what SecAgg+ reveals of the replies: Flower's quantized weighted mean
        protocol = SecAggParameters.of(run_config)
        revealed = revealed_update(protocol_aggregate(replies, list(counts.values()), protocol),
                                   [sent_to[victim] for victim in counts],
                                   [protocol.weight(count) for count in counts.values()], protocol)
        updates = {}
    done = attack_round(attack, updates, sent_to, counts, settings, armed=armed,
                        secure_aggregation=defense.secure_aggregation, max_images=None, seed=args.seed,
                        parameters=parameters, revealed=revealed) if counts else None
    if device.type == "cuda":
        torch.cuda.synchronize()
    attack_seconds = done.seconds if done else 0.0
    out = Path(args.out)
    rows = []
    read = sorted(counts) if not defense.secure_aggregation else [min(counts)] if counts else []
    for victim, result, norm, (images, labels) in zip(read, done.results if done else [],
                                                       done.update_norms if done else [], truth, strict=True):
        privacy: dict[str, Any] = {}
        if defense.dpsgd is not None:  # a victim holds its K x B examples only, and trains one round
            privacy[EPSILON_ROUND], privacy[EPSILON] = spent(defense.dpsgd, settings, settings.num_images, 1)
        inspected = flags[victim] if (defense.inspection is not None or defense.detectors) and \
            not defense.secure_aggregation else None
        rows.append(metrics_row(victim=victim, **score_and_save(result, images, labels, out / f"victim-{victim:03d}"),
                                update_norm=norm, inspect_flags=inspected, **privacy))
    for victim, reason in sorted(refused.items()):
        rows.append(metrics_row(ReplyStatus.REFUSED, victim=victim, reason=reason))
    rows.sort(key=lambda row: row.victim if row.victim is not None else -1)
    rewrite_jsonl(out / "metrics.jsonl", [row.to_json() for row in rows])
    own = attack.resolved()
    norms = [row.update_norm for row in rows if row.update_norm is not None]
    summary = {
        **summarise(rows),
        "update_norm_median": float(np.median(norms)) if norms else None,
        "iterations": own.get("iterations"),
        "attack_seconds": attack_seconds,
        "attack_seconds_per_victim": attack_seconds / len(rows),
        "seconds": time.perf_counter() - started,
        "attack": args.attack, "model": args.model, "init": args.init, "dataset": args.dataset,
        "train_mode": str(settings.mode), "batch_size": settings.batch_size, "local_steps": settings.local_steps,
        "epochs": settings.epochs,
        "lr": settings.lr, "momentum": settings.momentum, "batchnorm": str(settings.batchnorm), "defense": args.defense,
        "replay": not args.no_replay,
        "restarts": own.get("restarts"), "label_deals": own.get("label_deals"),
        "bn_statistics": own.get("bn_statistics"), "tv_weight": own.get("tv_weight"),
        "seed": args.seed,
        "imprint_bins": imprint_rows or None, "imprint_blocks": own.get("imprint_blocks"), "device": str(device),
        "victims_at_once": args.victims_at_once or args.num_victims,
    }
    write_json(out / "summary.json", summary)
    return summary


def main(args) -> int:
    summary = run(args)
    recovered = ", ".join(f"{_fmt(summary[recovered_key(db)], '.0%')} at {db} dB" for db in RECOVERED_DB)
    print(f"attack {summary['attack']}: {summary['victims']} victims ({summary['failed']} failed), PSNR median "
          f"{_fmt(summary['psnr_median'])} dB (min {_fmt(summary['psnr_min'])}), images recovered {recovered}, "
          f"labels right {_fmt(summary['label_share'], '.0%')}, attack {summary['attack_seconds']:.1f} s "
          f"({summary['attack_seconds_per_victim']:.1f} s per victim) -> {args.out}")
    if summary["victims"] == 0:
        print(f"fl-sim attack: every victim refused the model it was sent (--defense {summary['defense']}): exit "
              f"status {ALL_FAILED}")
        return ALL_FAILED
    if summary["failed"] == summary["victims"]:
        print(f"fl-sim attack: the attack failed for every victim (see {args.out}/metrics.jsonl): exit status "
              f"{ALL_FAILED}")
        return ALL_FAILED
    return 0


def _fmt(value, spec=".1f"):
    return "n/a" if value is None else format(value, spec)
