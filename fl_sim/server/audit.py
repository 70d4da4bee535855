"""The malicious server in a Flower app fl-sim did not write: `fl_sim.malicious(strategy, model=Net(), ...)` (over 450
lines: the public call's signature stands three times, its two typed overloads and itself, with its full docstring).

A user's ServerApp changes one line, the strategy's, and its server becomes a malicious one that attacks every
client's reply before the user's strategy aggregates it:

    strategy = fl_sim.malicious(FedAvg(fraction_train=0.5), model=Net(), context=context,
                                reference="data/cifar10/train", normalize=((0.5,) * 3, (0.5,) * 3), momentum=0.9)

It is fl-sim's `InvertingStrategy` (fl_sim/server/strategy.py: the reply checks, the attack, the round's end)
with what a user's app differs in:

- clients are named by their Flower node id (a stock ClientApp names no partition), and their replies may hold
  any metrics beside the `num-examples` the strategy weighs them by;
- the local training the attack replays is what the server knows: the learning rate in the train config it
  sends (`lr_key`), the local epochs and batch size in the run config (`epochs_key`, `batch_size_key`), each
  reply's num-examples; the user declares the rest once (the input normalization, the loss, the optimizer's
  momentum and weight decay);
- the truth: none is sent. `AuditRecorder` (fl_sim/server/auditor.py) scores each reconstruction against the
  nearest image of the reference set the user names, or against what a client disclosed with `fl_sim.disclose`
  (simulation only).
- the attacks: a client builds its own model and loads what it is sent strictly, so only attacks that set
  parameter values of its own architecture reach it (the passive ones, trap weights); those that add layers
  (imprint, mosaic) are refused in one line.

Every argument can be overridden from the run config as `audit-<argument>` (e.g. `flwr run . -c
"audit-attack='trap'"`), and so can each attack option fl-sim's own runs take (`audit-iterations`, ...).
A setting the attack cannot run with ends the run as failed with one line (`RunRefused`).
"""
import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, NoReturn, overload

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from attacker import resolve_device
from fl_sim.contract.attacks import attack_names, find_attack
from fl_sim.contract.protocol import DISCLOSED, METRICS, PROXIMAL_MU, TrainingSettings, TrainMode
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.data import DataNotFoundError, image_folder
from fl_sim.results.nearest import Reference
from fl_sim.results.outputs import write_json
from fl_sim.server.attacks import AttackContext, build_attack
from fl_sim.server.audit_legacy import LegacyAuditStrategy, design_images
from fl_sim.server.auditor import AuditRecorder
from fl_sim.server.refusal import refuse_run
from fl_sim.server.round import AttackPlan, ServerAttack
from fl_sim.server.strategy import ClientApps, InvertingStrategy, NodeNames

__all__ = ["Audit", "AuditError", "AuditStrategy", "malicious"]

PREFIX = "audit-"  # the run-config keys that override `malicious`'s arguments
OWN_MODELS_ONLY = ("trap-quiet",)  # attacks written against fl-sim's model classes (their declared trap layer)
LOSSES = ("cross_entropy",)  # what the inversion engine replays (torch.nn.CrossEntropyLoss, mean over the batch)
Images = str | Path | torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class AuditError(ValueError):
    """An audit that cannot run as asked, in one line."""


@dataclass(frozen=True)
class Audit:
    """What an audit does, as `malicious` resolved its arguments and the run config's `audit-*` keys.

    Parameters
    ----------
    attack
        A registered attack (`fl-sim attacks` lists them) that sets only parameter values, or a passive one.
    out
        The output folder.
    max_images
        The most images behind an update the attack reads (a client of more gets a "skipped" row).
    seed
        The seed of the attack's draws.
    device
        Where the attack computes: "auto", "cpu", "cuda" or "cuda:N".
    momentum, weight_decay
        The clients' SGD momentum and weight decay (the server cannot know them).
    loss
        The clients' loss ("cross_entropy").
    lr_key, epochs_key, batch_size_key
        Where the server finds the learning rate (the train config it sends, else the run config), the local
        epochs and the batch size (the run config).
    every
        Attack rounds 1, 1 + every, ...
    options
        The attack's own options (fl-sim's RunConfig names: iterations, restarts, ...).
    """

    attack: str = "ig"
    out: str = "out/audit"
    max_images: int = 64
    seed: int = 0
    device: str = "auto"
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "cross_entropy"
    lr_key: str = "lr"
    epochs_key: str = "local-epochs"
    batch_size_key: str = "batch-size"
    every: int = 1
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolved(cls, arguments: Mapping[str, Any], run_config: Mapping[str, Any]) -> "Audit":
        """The arguments, each overridden by its run-config key `audit-<name>`; the other `audit-*` keys are the
        attack's options."""
        values = dict(arguments)
        options = dict(values.pop("options", None) or {})
        defaults = cls()
        own = {entry.name for entry in fields(cls) if entry.name != "options"}
        for key, value in run_config.items():
            if not key.startswith(PREFIX):
                continue
            name = key.removeprefix(PREFIX).replace("-", "_")
            if name in own:
                kind = type(getattr(defaults, name))
                try:
                    values[name] = kind(value)
                except (TypeError, ValueError):
                    raise AuditError(f"run config {key} = {value!r} is not a {kind.__name__}") from None
            elif name in ("reference", "public"):
                continue  # read by `malicious` itself
            else:
                options[name] = value
        unknown = sorted(set(options) - {entry.name for entry in fields(RunConfig)})
        if unknown:
            raise AuditError(f"unknown attack option(s) {', '.join(unknown)} (audit-* run-config keys and "
                             "`options` take fl-sim's attack settings: iterations, restarts, label_deals, tv_weight, "
                             "...)")
        audit = cls(**values, options=options)
        audit.check()
        return audit

    def check(self) -> None:
        spec = find_attack(self.attack)
        if spec is None:
            raise AuditError(f"unknown attack {self.attack!r}: one of {', '.join(attack_names())}")
        if self.attack in OWN_MODELS_ONLY:
            raise AuditError(f"{self.attack} arms fl-sim's own models (mlp, cnn) only; on a user's model use trap or "
                             "qbi")
        if spec.needs_imprint:
            raise AuditError(f"{self.attack} adds layers to the model (the imprint block): a client that loads what "
                             "it is sent strictly (load_state_dict's default) refuses it. Parameter-only attacks "
                             "reach a user's model: trap, qbi, or a passive one (ig, fedavg, ...)")
        if self.loss not in LOSSES:
            raise AuditError(f"loss {self.loss!r}: the attack replays {', '.join(LOSSES)} only")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.max_images < 1 or self.every < 1:
            raise AuditError("momentum must be in [0, 1), weight_decay >= 0, max_images and every >= 1")

    def run_config(self) -> RunConfig:
        """The attack's settings in fl-sim's RunConfig (what `Attack.build` reads)."""
        try:
            return RunConfig.from_values({"attack": self.attack, "seed": self.seed, "device": self.device,
                                          "max_attack_images": self.max_images, **self.options})
        except (ConfigError, ValueError, TypeError) as error:
            raise AuditError(f"attack options: {error}") from None


def training_reader(audit: Audit, run_config: Mapping[str, Any]) -> Callable[[ConfigRecord], TrainingSettings]:
    """What a train message's config (and the run config) say of the clients' local training: E epochs over their
    data in batches of B at the config's learning rate, with the declared momentum and weight decay; FedProx's mu
    where the strategy sends it."""

    def read(config: Mapping[str, Any]) -> TrainingSettings:
        lr = config.get(audit.lr_key, run_config.get(audit.lr_key))
        batch = run_config.get(audit.batch_size_key)
        missing = [f"{what} ({key!r})" for what, key, value in (("the learning rate", audit.lr_key, lr),
                                                               ("the batch size", audit.batch_size_key, batch))
                   if value is None]
        if missing or lr is None or batch is None:
            raise AuditError(f"the server cannot find {' and '.join(missing)} in the train config it sends or the "
                             "run config: name the keys (lr_key=, batch_size_key=, epochs_key=)")
        try:
            epochs = int(run_config.get(audit.epochs_key, 1))
            return TrainingSettings(lr=float(lr), batch_size=int(batch), epochs=epochs,
                                    momentum=audit.momentum, weight_decay=audit.weight_decay,
                                    proximal_mu=float(config.get(PROXIMAL_MU, 0.0)), mode=TrainMode.EPOCHS)
        except ValueError as error:
            raise AuditError(f"the clients' training as the server reads it: {error}") from None

    return read


def normalized(model: nn.Module, normalize: tuple[Sequence[float], Sequence[float]] | None) -> nn.Module:
    """The attack's copy of `model`, taking images in [0, 1]: the clients' input normalization is a forward pre-hook,
    so its state_dict keys are the user's own."""
    copied = copy.deepcopy(model).cpu()
    if normalize is not None:
        mean, std = (torch.tensor([float(v) for v in values]).view(1, -1, 1, 1) for values in normalize)
        if (std <= 0).any():
            raise AuditError(f"normalize: every std must be positive, got {normalize[1]}")

        def scale(_: nn.Module, args: tuple) -> tuple:
            return ((args[0] - mean.to(args[0].device)) / std.to(args[0].device), *args[1:])

        copied.register_forward_pre_hook(scale)
    return copied


def load_images(images: Images, normalize: tuple[Sequence[float], Sequence[float]] | None,
                what: str) -> Reference:
    """A reference (or public) set: an image folder (class sub-folders), or images in [0, 1] with or without
    labels."""
    if isinstance(images, str | Path):
        try:
            dataset = image_folder(Path(images).expanduser(), Path(images).name)
        except (DataNotFoundError, ConfigError) as error:
            raise AuditError(f"{what}: {error}") from None
        tensors, folder_labels = dataset.tensors(range(len(dataset)))
        return Reference.of(tensors, folder_labels, str(images))
    labels: torch.Tensor | None
    tensors, labels = images if isinstance(images, tuple) else (images, None)
    if tensors.dim() != 4 or not (float(tensors.min()) >= 0 and float(tensors.max()) <= 1):
        raise AuditError(f"{what}: images must be (N, C, H, W) in [0, 1], got {tuple(tensors.shape)} in "
                         f"[{float(tensors.min()):.3g}, {float(tensors.max()):.3g}]")
    return Reference.of(tensors, labels, f"{what} ({len(tensors)} images)")


class AuditStrategy(InvertingStrategy):
    """A user's Flower strategy with a malicious server around it (`malicious` builds it; the module docstring).

    Its rounds are `InvertingStrategy`'s; before them it takes off each reply what its client disclosed
    (`fl_sim.disclose`) and notes its num-examples for the recorder, and after them it rebuilds the gallery.
    """

    def __init__(self, strategy: Strategy, attack: ServerAttack, recorder: AuditRecorder, audit: Audit,
                 model: nn.Module, apps: ClientApps, denormalize: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(strategy, attack, recorder, partitions=NodeNames(), apps=apps,
                         max_shard=10**9)
        self.audit, self.audit_recorder, self.model, self.denormalize = audit, recorder, model, denormalize
        self.seen_counts: list[int] = []  # the num-examples of the last round's replies

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's `Strategy.start`, once the model it starts from is checked against the audit's model and the
        training it will read is found."""
        check_arrays(self.model, initial_arrays)
        try:
            self.apps.settings(train_config or ConfigRecord())
        except AuditError as error:
            refuse(str(error))
        log(INFO, "fl-sim audit: %s on every client's reply, writing to %s", self.audit.attack, self.audit.out)
        result = super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                               train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)
        log(INFO, "fl-sim audit: the reconstructions of every client and round are in %s",
            Path(self.audit.out) / "gallery.html")
        return result

    def design_images(self, settings: TrainingSettings) -> int:
        """What an active attack arms for: the clients' median num-examples of the last round read (the server
        learns them from the replies), before any reply one epoch's batches; never more than `max_images`."""
        return design_images(self.seen_counts, settings, self.audit.max_images)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        counts = self.audit_recorder.counts.setdefault(server_round, {})
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            disclosed = reply.content.array_records.get(DISCLOSED)
            if disclosed is not None:
                del reply.content[DISCLOSED]
                images = torch.from_numpy(disclosed["images"].numpy())
                labels = torch.from_numpy(disclosed["labels"].numpy()).long()
                self.audit_recorder.disclosed[(server_round, node)] = (self.denormalize(images).clamp(0, 1), labels)
            metrics = reply.content.metric_records.get(METRICS)
            count = metrics.get(self.weighted_by_key) if metrics is not None else None
            if isinstance(count, int | float):
                counts[node] = int(count)
        if counts:
            self.seen_counts = list(counts.values())
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.audit_recorder.round_done(server_round)


def check_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """The strategy's initial arrays must be the audit model's state_dict, key by key and shape by shape."""
    mine = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    theirs = {name: tuple(array.shape) for name, array in arrays.items()}
    if mine != theirs:
        missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        differ = [name for name in mine if name in theirs and mine[name] != theirs[name]]
        detail = (f"missing {missing[:3]}" if missing else f"extra {extra[:3]}" if extra else
                  f"{differ[0]} is {theirs[differ[0]]} there, {mine[differ[0]]} in the model")
        refuse(f"the model given to fl_sim.malicious is not the one the strategy starts from: {detail}")


def refuse(message: str) -> NoReturn:
    """Ends the run as failed in one line: `RunRefused`, which Flower records as the run's failure (`flwr ls`)."""
    refuse_run(f"fl_sim.malicious: {message}")


@overload
def malicious(strategy: Strategy, *, model: nn.Module, context: Context | None = None, attack: str = "ig",
              out: str | Path = "out/audit", reference: Images | None = None, public: Images | None = None,
              normalize: tuple[Sequence[float], Sequence[float]] | None = None, momentum: float = 0.0,
              weight_decay: float = 0.0, loss: str = "cross_entropy", max_images: int = 64, seed: int = 0,
              device: str = "auto", every: int = 1, options: Mapping[str, Any] | None = None,
              lr_key: str = "lr", epochs_key: str = "local-epochs", batch_size_key: str = "batch-size",
              image_shape: tuple[int, int, int] | None = None) -> AuditStrategy: ...


@overload
def malicious(strategy: LegacyStrategy, *, model: nn.Module, context: Context | None = None, attack: str = "ig",
              out: str | Path = "out/audit", reference: Images | None = None, public: Images | None = None,
              normalize: tuple[Sequence[float], Sequence[float]] | None = None, momentum: float = 0.0,
              weight_decay: float = 0.0, loss: str = "cross_entropy", max_images: int = 64, seed: int = 0,
              device: str = "auto", every: int = 1, options: Mapping[str, Any] | None = None,
              lr_key: str = "lr", epochs_key: str = "local-epochs", batch_size_key: str = "batch-size",
              image_shape: tuple[int, int, int] | None = None) -> LegacyAuditStrategy: ...


def malicious(strategy: Strategy | LegacyStrategy, *, model: nn.Module, context: Context | None = None,
              attack: str = "ig",
              out: str | Path = "out/audit", reference: Images | None = None, public: Images | None = None,
              normalize: tuple[Sequence[float], Sequence[float]] | None = None, momentum: float = 0.0,
              weight_decay: float = 0.0, loss: str = "cross_entropy", max_images: int = 64, seed: int = 0,
              device: str = "auto", every: int = 1, options: Mapping[str, Any] | None = None,
              lr_key: str = "lr", epochs_key: str = "local-epochs", batch_size_key: str = "batch-size",
              image_shape: tuple[int, int, int] | None = None) -> AuditStrategy | LegacyAuditStrategy:
    """`strategy` with a malicious server around it: every client's reply is attacked before `strategy`
    aggregates it, and the reconstructions of every client and round are written to `out`.

    Parameters
    ----------
    strategy
        The app's own Flower strategy, which still samples and aggregates every round exactly as it would: a
        Message-API one (flwr.serverapp.strategy: FedAvg, FedProx, ... or the user's own), or a legacy one
        (flwr.server.strategy) that the app puts in a LegacyContext, as Flower's SecAgg+ path requires
        (fl_sim/server/audit_legacy.py).
    model
        The architecture the clients build (a fresh `Net()`): the attack's model. Its state_dict must be what
        the strategy starts from.
    context
        The ServerApp's Context: its run config holds the local epochs and batch size, and any `audit-*` key
        overrides an argument here.
    attack
        A passive attack (ig, fedavg, dlg, idlg, ...) or one that sets only parameter values (trap).
    out
        Where metrics.jsonl, each client's images per round and gallery.html go.
    reference
        The images the clients' data come from (an image folder of class sub-folders, or images in [0, 1]
        with or without labels): each reconstruction is scored against its nearest image there.
    public
        The server's own images (an active attack places its rows by their statistics); default: `reference`.
    normalize
        The clients' input normalization, (mean per channel, std per channel), as in their transforms.
    momentum, weight_decay
        The clients' SGD momentum and weight decay.
    loss
        The clients' loss: "cross_entropy".
    max_images
        The most images behind one update the attack reads; a client holding more gets a "skipped" row.
    seed
        The seed of the attack's draws.
    device
        Where the attack computes: "auto" (CUDA when there is one), "cpu", "cuda".
    every
        Attack rounds 1, 1 + every, 1 + 2 x every, ...
    options
        The attack's own settings, by fl-sim's names (iterations, restarts, label_deals, tv_weight, ...).
    lr_key, epochs_key, batch_size_key
        The keys of the learning rate (the train config the server sends, else the run config), the local
        epochs and the batch size (the run config).
    image_shape
        (C, H, W) of the clients' images, when no reference set is given.

    Returns
    -------
    AuditStrategy or LegacyAuditStrategy
        A strategy of the kind given: call its `start`, or put it in the LegacyContext, as the app did the
        strategy's.

    Raises
    ------
    RunRefused
        (Flower's AppExitException) with one line, when the audit cannot run as asked: the run ends as failed.
    """
    try:
        return _malicious(strategy, model, context, locals())
    except AuditError as error:
        refuse(str(error))


def _malicious(strategy: Strategy | LegacyStrategy, model: nn.Module, context: Context | None,
               given: dict[str, Any]) -> AuditStrategy | LegacyAuditStrategy:
    if not isinstance(strategy, Strategy | LegacyStrategy):
        raise AuditError(f"strategy must be a Flower strategy (flwr.serverapp.strategy, or flwr.server.strategy "
                         f"in a LegacyContext), got {type(strategy).__name__}")
    if not isinstance(model, nn.Module):
        raise AuditError(f"model must be the torch.nn.Module the clients build, got {type(model).__name__}")
    run_config = dict(context.run_config) if context is not None else {}
    arguments = {name: given[name] for name in ("attack", "max_images", "seed", "device", "momentum", "weight_decay",
                                                "loss", "lr_key", "epochs_key", "batch_size_key", "every", "options")}
    arguments["out"] = str(given["out"])
    audit = Audit.resolved(arguments, run_config)
    normalize = given["normalize"]
    reference_given = run_config.get(PREFIX + "reference", given["reference"])
    reference_given = None if isinstance(reference_given, str) and not reference_given else reference_given
    public_given = run_config.get(PREFIX + "public", given["public"])
    public_given = reference_given if isinstance(public_given, str) and not public_given or public_given is None \
        else public_given
    reference = load_images(reference_given, normalize, "reference") if reference_given is not None else None
    shape = given["image_shape"] or (tuple(reference.pixels.shape[1:]) if reference is not None else None)
    if shape is None:
        raise AuditError("name the reference set (reference=) or the clients' image shape (image_shape=)")
    channels, height, width = shape
    attack_model = normalized(model, normalize)
    classes = output_classes(attack_model, (channels, height, width))
    out = fresh_folder(Path(audit.out))
    audit = dataclasses.replace(audit, out=str(out))
    public_set: list[Reference] = []

    def public_images() -> torch.Tensor:
        if not public_set:
            if public_given is None:
                raise AuditError("this attack places its rows by the server's own images: name them (public= or "
                                 "reference=)")
            public_set.append(reference if public_given is reference_given and reference is not None
                              else load_images(public_given, normalize, "public"))
        return public_set[0].images(torch.arange(len(public_set[0])))

    device = resolve_device(audit.device)
    config = audit.run_config()
    try:
        built = build_attack(AttackContext(audit.attack, config, attack_model, (channels, height, width), classes,
                                           device, public_images))
    except (ValueError, TypeError) as error:
        said = str(error)
        raise AuditError(said if said.startswith(audit.attack) else
                         f"{audit.attack} cannot attack {type(model).__name__}: {said}") from None
    names = tuple(name for name, _ in model.named_parameters())
    server_attack = ServerAttack(built, names, AttackPlan(audit.every), audit.seed, audit.max_images)
    recorder = AuditRecorder(out, lambda: reference)
    apps = ClientApps(settings=training_reader(audit, run_config), metrics=(), named_by_partition=False,
                      open_metrics=True, expands_rows=False)
    write_run(out, audit, strategy, model, normalize, reference)
    if isinstance(strategy, LegacyStrategy):
        return LegacyAuditStrategy(strategy, server_attack, recorder, list(model.state_dict()), apps.settings,
                                   audit.out)
    return AuditStrategy(strategy, server_attack, recorder, audit, model, apps, partial(denormalized, normalize))


def denormalized(normalize: tuple[Sequence[float], Sequence[float]] | None, images: torch.Tensor) -> torch.Tensor:
    """Images as the clients' loader gave them, back in [0, 1]."""
    if normalize is None:
        return images.float()
    mean, std = (torch.tensor([float(v) for v in values]).view(1, -1, 1, 1) for values in normalize)
    return images.float() * std + mean


def output_classes(model: nn.Module, shape: tuple[int, int, int]) -> int:
    """The classes the model's logits give for two images of `shape` (the model must give (batch, classes))."""
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.rand(2, *shape))
    except Exception as error:  # the user's model on the images it was named: any failure is theirs to fix
        raise AuditError(f"the model cannot take images of shape {shape}: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from None
    finally:
        model.train()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 2 or logits.shape[1] < 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise AuditError(f"the model gives {got} for 2 images: the attack needs logits of shape (batch, classes)")
    return int(logits.shape[1])


def fresh_folder(out: Path) -> Path:
    """`out`, or `out-2`, `out-3`, ... where `out` already holds an audit: an earlier audit is never overwritten."""
    candidate, number = out, 1
    while (candidate / "metrics.jsonl").exists() or (candidate / "run.json").exists():
        number += 1
        candidate = out.with_name(f"{out.name}-{number}")
    if candidate != out:
        log(WARNING, "fl-sim audit: %s holds an earlier audit; this one writes to %s", out, candidate)
    try:
        candidate.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AuditError(f"cannot write to {str(candidate)!r}: {error.strerror or error}") from None
    return candidate


def write_run(out: Path, audit: Audit, strategy: Strategy | LegacyStrategy, model: nn.Module,
              normalize: tuple[Sequence[float], Sequence[float]] | None, reference: Reference | None) -> None:
    """OUT/run.json: what was audited and how (the gallery shows it)."""
    described = {**{name: value for name, value in dataclasses.asdict(audit).items() if name != "options"},
                 **{f"option {name}": value for name, value in audit.options.items()},
                 "strategy": type(strategy).__name__, "model": type(model).__name__,
                 "parameters": sum(p.numel() for p in model.parameters()),
                 "normalize": [list(values) for values in normalize] if normalize else None,
                 "reference": reference.name if reference is not None else None}
    write_json(out / "run.json", {"audit": described})

