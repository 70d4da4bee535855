"""Every setting of a federated run, declared once, read once from CLI flags or Flower's run config.

`fl-sim run` flags and Flower's run config (`[tool.flwr.app.config]` of pyproject.toml, with `flwr run -c`
overrides) are two spellings of the same settings: `RunConfig.from_flower` and `RunConfig.from_values` both
coerce each value to its field's type (fl_sim/contract/setting.py `coerce`, by the type or the parser its
`Setting` declares) or raise ConfigError with one sentence (`local-steps=1.5` is an error, not 1). Strings live
only at those edges: inside the program a defense is a DefenseSpec, a fault a Fault, a strategy a StrategyName.
Each field is the one declaration of its setting: type, default and `Setting` (help, bounds, Flower key), from
which fl_sim/commands/config.py builds the flags and `RunConfig.check` the bounds; pyproject.toml repeats the
defaults (tests/test_settings.py checks). The checks of one part live beside it (attacks.py `check_attack`,
defenses.py `check_privacy`, `check_secagg`); `check` runs them all. Standard library only, so the server, the
clients and every light sub-command (`fl-sim report`) can import it.
"""
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from fl_sim.contract.attacks import IMPRINT_BINS, check_attack, check_attack_name, find_attack
from fl_sim.contract.defenses import (
    DEFENSE_KINDS,
    SECAGG_MODULUS,
    DefenseSpec,
    DpSgd,
    LocalDp,
    ServerDp,
    check_privacy,
    check_secagg,
)
from fl_sim.contract.faults import FAULT_HELP, Fault, faults_value
from fl_sim.contract.models import model_names, model_value
from fl_sim.contract.names import DatasetName, Device, PartitionScheme, StrategyName
from fl_sim.contract.protocol import BatchNormMode, TrainingSettings, TrainMode
from fl_sim.contract.setting import (
    SETTING,
    ConfigError,
    Group,
    Setting,
    coerce,
    flag_of,
    parse_client_list,
    setting,
    to_text,
)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one federated run, each declared once: its type, default and `Setting` (help, bounds).

    Field names are the argparse names of `fl-sim run`; Flower's keys are the same with hyphens (two
    differ: Setting.flower_key). Built directly, from flags or from Flower's run config, every value is
    coerced to its field's type (__post_init__), so a RunConfig is always typed. The order of the fields
    is the order of their flags in --help, of the keys in run.json and in pyproject.toml.
    """

    out: str = setting("out/flwr-run", Setting("output folder", Group.GENERAL, given=True, flower_key="out-dir"))
    rounds: int = setting(3, Setting("federated rounds", Group.FEDERATION, least=1, flower_key="num-server-rounds"))
    num_clients: int = setting(2, Setting("clients, one per partition", Group.FEDERATION, least=1))
    dataset: DatasetName = setting(DatasetName.MNIST, Setting(
        f"one of {', '.join(DatasetName)} (default %(default)s)", Group.DATA))
    data_root: str | None = setting(None, Setting(  # None: $FL_SIM_DATA, else ./data
        "folder holding the data (default $FL_SIM_DATA, else ./data)", Group.DATA, resumable=True))
    # a ReLU ConvNet, as federations train (DLG's sigmoid LeNet hardly learns: --model lenet)
    model: str = setting("cnn", Setting(f"one of {', '.join(model_names())} (default %(default)s)", Group.DATA,
                                        parse=model_value))
    init: str = setting("default", Setting(
        "'default' (PyTorch's, seeded), 'paper' (U(-0.5, 0.5), as DLG) or a checkpoint path", Group.DATA))
    partition: PartitionScheme = setting(PartitionScheme.IID, Setting(
        "how the training set is split: iid, or dirichlet (label skew, see --alpha)", Group.FEDERATION, choices=True))
    alpha: float = setting(0.5, Setting("Dirichlet concentration: small = each client sees few classes",
                                        Group.FEDERATION, above=0))
    # with max_shard: each client keeps a seeded number of its partition's examples in between
    min_shard: int = setting(48, Setting("with --max-shard: the fewest examples a client keeps of its partition",
                                        Group.FEDERATION, least=1))
    max_shard: int = setting(64, Setting(  # 0: every client keeps its whole partition
        "each client keeps a seeded number of its partition's examples, from --min-shard to this (unequal shards; "
        "default %(default)s); 0: its whole partition", Group.FEDERATION, least=0))
    fraction_train: float = setting(1.0, Setting(  # the share of clients Flower samples each round
        "the share of clients Flower samples for each round (default %(default)g: all)", Group.FEDERATION,
        above=0, most=1))
    strategy: StrategyName = setting(StrategyName.FEDAVG, Setting(
        "the Flower strategy the malicious server wraps (default %(default)s)", Group.FEDERATION, choices=True))
    proximal_mu: float = setting(0.0, Setting(  # FedProx's mu (strategy fedprox only)
        "FedProx's proximal weight mu (with --strategy fedprox)", Group.FEDERATION))
    server_lr: float = setting(0.01, Setting(  # FedAdam's / FedYogi's server learning rate (eta)
        "the server optimiser's learning rate eta (with --strategy fedadam or fedyogi)", Group.FEDERATION, above=0))
    train_mode: TrainMode = setting(TrainMode.EPOCHS, Setting(
        "fedsgd: one step on B examples; steps: K steps of B examples drawn each round; epochs: E epochs over the "
        "client's whole shard in shuffled batches of B (default %(default)s)", Group.TRAINING, choices=True))
    local_steps: int = setting(1, Setting("K SGD steps per round (steps mode)", Group.TRAINING))
    batch_size: int = setting(16, Setting("B examples per step (default %(default)s)", Group.TRAINING))
    epochs: int = setting(1, Setting(
        "E passes over the shard (epochs mode) or over the K x B round examples (steps mode)", Group.TRAINING))
    lr: float = setting(0.05, Setting("client learning rate", Group.TRAINING))
    momentum: float = setting(0.9, Setting("client SGD momentum", Group.TRAINING))
    weight_decay: float = setting(0.0, Setting("client SGD weight decay", Group.TRAINING))
    batchnorm: BatchNormMode = setting(BatchNormMode.TRAIN, Setting(
        "batch-norm layers in local training: batch statistics (train, default) or the model's running ones, not "
        "updated (frozen)", Group.TRAINING, choices=True))
    defense: DefenseSpec = setting(DefenseSpec(), Setting(
        f"what clients do to their update before sending it: {', '.join(DEFENSE_KINDS)}, or steps joined by '+', "
        "e.g. clip:4+noise:0.01 (see clients/defenses.py); dpsgd and ldp use Opacus' and Flower's code, e.g. "
        f"{DpSgd.EXAMPLE} or {LocalDp.EXAMPLE}; inspect: clients check the model they are sent and "
        "refuse it (inspect:flag: train and flag it) when it fails (clients/inspection.py)", Group.TRAINING,
        metavar="SPEC"))
    secagg_shares: float = setting(3.0, Setting(  # SecAggPlusWorkflow's num_shares
        "SecAgg+: shares each client's secrets are split into, among its neighbours: a count above 2, or a "
        "fraction (at most 1) of the round's clients (default %(default)s, Flower's example)", Group.SECAGG,
        above=0))
    secagg_threshold: float = setting(2.0, Setting(  # SecAggPlusWorkflow's reconstruction_threshold
        "SecAgg+: shares that rebuild a secret (a dropped client's mask): a count below --secagg-shares, or a "
        "fraction (at most 1) of the shares (default %(default)s)", Group.SECAGG, above=0))
    secagg_clipping_range: float = setting(8.0, Setting(
        "SecAgg+: each client's example-weighted parameters are clipped to +-this before quantization "
        "(default %(default)s, Flower's)", Group.SECAGG, above=0))
    secagg_quantization_range: int = setting(2**22, Setting(
        "SecAgg+: quantization levels over the clipping range (default %(default)s = 2^22, Flower's; below "
        "2^32 / clients a round, the masks' modulus)", Group.SECAGG, above=1, most=SECAGG_MODULUS - 1))
    secagg_max_weight: float = setting(1000.0, Setting(
        "SecAgg+: the largest example count a client may weigh in with; weights are num-examples / this, "
        "so a smaller one quantizes finer (default %(default)s, Flower's)", Group.SECAGG, above=0))
    secagg_timeout: float = setting(0.0, Setting(  # 0: wait for every reply (a simulation's crash is a reply)
        "SecAgg+: seconds each of the protocol's four stages waits for replies; a client that misses it has "
        "dropped out (default 0: wait for all)", Group.SECAGG, least=0))
    secagg_in_flight: int = setting(0, Setting(  # SummingGrid's window (fl_sim/server/secagg.py)
        "SecAgg+: the most of a stage's messages handed to Flower at once when the stage waits for every reply "
        "(default 0: in a simulation 4 a core of the server's machine, a deployment all at once)", Group.SECAGG,
        least=0))
    server_dp: ServerDp = setting(ServerDp(), Setting(
        f"Flower's central DP wrapper around the strategy: none (default), {ServerDp.EXAMPLE} (the server clips "
        "and noises) or client:noise=Z:clip=C (Flower's fixedclipping_mod clips on the clients); the attack reads "
        "the replies before it, as a malicious server would", Group.FEDERATION, metavar="SPEC"))
    attack: str = "imprint"  # its flag is written by hand in fl_sim/commands/config.py (the attack registry's names)
    iterations: int = setting(300, Setting(
        "optimiser iterations per victim (an L-BFGS iteration is up to 20 updates, as in DLG)", Group.ATTACK,
        least=1))
    restarts: int | None = setting(None, Setting(  # None: the attack preset's
        "random restarts per victim", Group.ATTACK, least=1, zero="the preset's"))
    label_deals: int | None = setting(None, Setting(  # None: the attack preset's
        "several steps a round: ways of dealing the recovered labels into the steps, each optimised as its own row "
        "and the best kept; the FedAvg attack's epoch copies take one deal each", Group.ATTACK, least=1,
        zero="the preset's, 8"))
    bn_statistics: float = setting(0.0, Setting(  # weight of the batch-norm statistics term (GradInversion); 0: off
        "weight of a term matching the batch-norm running statistics the client sent to those the replay produces "
        "(GradInversion; 0: off, default; docs/attacks.md)", Group.ATTACK, least=0, metavar="WEIGHT"))
    tv_weight: float | None = setting(None, Setting(  # None: the attack preset's
        "weight of the total-variation image prior (default: the preset's; ig and fedavg 0.01, dlg and idlg 0); the "
        "best weight depends on the model (docs/findings.md)", Group.ATTACK, least=0, metavar="WEIGHT"))
    no_replay: bool = setting(False, Setting(
        "treat the weight change / (steps x lr) as one gradient instead of replaying K steps", Group.ATTACK))
    max_attack_images: int = setting(64, Setting(  # an update of more images (epochs mode: a larger shard)
        "updates of more images (in epochs mode: larger shards) are not attacked; their row says so",
        Group.FEDERATION, least=1))
    attack_async: bool = setting(False, Setting(  # beside the next round's training (fl_sim/server/background.py)
        "run a passive attack (dlg, idlg, ig, fedavg) on a background thread beside the next round's training instead "
        "of before the aggregate: the same rows; not with imprint or trap (default: off)", Group.FEDERATION,
        negatable=True, resumable=True))
    attack_every: int = setting(1, Setting("attack rounds 1, 1+N, 1+2N, ... (default every round)", Group.FEDERATION,
                                           least=1))
    attack_clients: tuple[int, ...] | None = setting(None, Setting(  # None: every client
        "partition ids to attack, e.g. 0,2 (default all)", Group.FEDERATION, flag_default="all",
        parse=parse_client_list))
    imprint_bins: int = setting(0, Setting(  # 0: 256 with --attack imprint, the round's need with mosaic
        "rows of the imprint block the clients build (default 256 with --attack imprint; with mosaic the rows the "
        "round needs: clients sampled x images a client x 4 rows an image, 6 over several steps)", Group.ATTACK,
        least=0))
    imprint_blocks: int = setting(4, Setting(  # the server's choice only
        "statistics the imprint rows measure; more blocks, fewer images sharing every bin (default %(default)s)",
        Group.ATTACK, least=1))
    disguise_checkpoint: str = setting("", Setting(  # benchmarks/disguise_train.py writes it
        "--attack disguise: the model and secret decoder trained together (benchmarks/disguise_train.py --out)",
        Group.ATTACK, metavar="PATH"))
    client_eval: bool = setting(False, Setting(
        "also have clients evaluate the global model on their share of the test split", Group.FEDERATION))
    device: str = setting(Device.AUTO, Setting(f"{', '.join(Device)}", Group.ATTACK, resumable=True))
    seed: int = setting(0, Setting("seed of the run's random draws (default %(default)s)", Group.GENERAL, least=0))
    inject_faults: dict[int, Fault] = field(default_factory=dict, metadata={SETTING: Setting(  # partition id -> fault
        f"clients that send bad replies every round, e.g. 0=nan,2=crash; kinds: {', '.join(FAULT_HELP)}",
        Group.FAULTS, metavar="CLIENT=KIND,...", parse=faults_value)})


    def __post_init__(self):
        for spec in fields(self):
            name = spec.name
            object.__setattr__(self, name, coerce(FIELD_TYPES[name], DECLARED.get(name), getattr(self, name),
                                                  flag_of(name)))

    @classmethod
    def from_values(cls, values: Mapping[str, object], defaults: "RunConfig | None" = None) -> "RunConfig":
        """Field name -> value (e.g. the flags a user gave) over `defaults`; unknown names are errors."""
        unknown = sorted(set(values) - {spec.name for spec in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
        raw: dict[str, typing.Any] = dict(values)  # untyped as given: __post_init__ coerces each to its field's type
        return dataclasses.replace(defaults or cls(), **raw)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object], defaults: "RunConfig | None" = None) -> "RunConfig":
        """Flower's run config (hyphenated keys) over `defaults`; an unknown key is an error, not ignored."""
        by_key = {flower_key(spec.name): spec.name for spec in fields(cls)}
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {', '.join(unknown)}: known are {', '.join(by_key)}")
        return cls.from_values({by_key[key]: value for key, value in run_config.items()}, defaults)

    def to_flower(self) -> dict[str, object]:
        """The run config as Flower keys and TOML-able values (the inverse of from_flower); a None whose
        setting declares what 0 means is written as 0."""
        return {flower_key(spec.name): 0 if getattr(self, spec.name) is None and spec.name in ZERO_IS_NONE
                else to_text(getattr(self, spec.name)) for spec in fields(self)}

    @property
    def imprint_rows(self) -> int:
        """The imprint block's rows in the architecture every client builds (0: no block): --imprint-bins when
        given; else, for an attack that sizes its rows (the mosaic), the rows the round needs (`sized_rows`);
        else the preset block of an attack that needs one."""
        if self.imprint_bins:
            return self.imprint_bins
        spec = find_attack(self.attack)  # None in a process that has not registered the attack (a test's, in Ray)
        if spec is None or not spec.needs_imprint:
            return 0
        return self.sized_rows if spec.sizes_rows is not None else IMPRINT_BINS

    @property
    def sampled_clients(self) -> int:
        """The clients Flower's strategy samples for a round: int(clients x fraction), at least 1 (as FedAvg)."""
        return max(1, int(self.num_clients * self.fraction_train))

    @property
    def round_targets(self) -> int:
        """The clients an active attack arms in a round: those sampled, at most the --attack-clients."""
        sampled = self.sampled_clients
        return min(sampled, len(self.attack_clients)) if self.attack_clients else sampled

    @property
    def client_images(self) -> int | None:
        """The most images a client trains on in a round: K x B (fedsgd, steps), its shard in epochs mode (at
        most --max-shard; None over whole partitions, which only the data set knows)."""
        training = self.training
        if training.mode == TrainMode.EPOCHS:
            return self.max_shard or None
        return training.num_images

    @property
    def one_local_step(self) -> bool:
        """Whether every client's round is one SGD step (epochs mode: one epoch over a shard within one batch)."""
        return self.training.single_step(self.client_images)

    @property
    def sized_rows(self) -> int:
        """The rows an attack that sizes its block (its `AttackSpec.sizes_rows`) needs for this run's rounds: the
        round's targets x the images each trains on x its rows an image, one local step or several. The clients
        build the block from this number and the server arms it, both through `imprint_rows`."""
        spec = find_attack(self.attack)
        if spec is None or spec.sizes_rows is None:
            raise ConfigError(f"--attack {self.attack} does not size its imprint rows: pass --imprint-bins")
        images = self.client_images
        if images is None:
            raise ConfigError(f"--attack {self.attack} sizes its imprint rows from the images a client trains on, "
                              "which in epochs mode over whole partitions (--max-shard 0) only the data set knows: "
                              "pass --imprint-bins, or --max-shard")
        return spec.sizes_rows.rows(self.round_targets, images, self.imprint_blocks, self.one_local_step)

    def check_rows(self) -> None:
        """An explicit --imprint-bins too small for the clients an attack that sizes its rows deals them out to,
        refused (ConfigError naming the value that would do) before any round."""
        spec = find_attack(self.attack)
        if not self.imprint_bins or spec is None or spec.sizes_rows is None:
            return
        targets, blocks = self.round_targets, self.imprint_blocks
        least = spec.sizes_rows.least(targets, blocks)
        if self.imprint_bins < least:
            raise ConfigError(f"--attack {self.attack}: {self.imprint_bins} imprint rows cannot give {targets} "
                              f"clients a round {blocks} blocks of {spec.sizes_rows.least_bins} or more bins each: "
                              f"pass --imprint-bins {least} or more, or leave it out to size the block for the round")

    @property
    def training(self) -> TrainingSettings:
        """The local training the server configures every round."""
        try:
            return TrainingSettings(lr=self.lr, local_steps=self.local_steps, batch_size=self.batch_size,
                                    epochs=self.epochs, momentum=self.momentum, batchnorm=self.batchnorm,
                                    proximal_mu=self.proximal_mu, mode=self.train_mode,
                                    weight_decay=self.weight_decay)
        except ValueError as error:  # its messages start with the setting's name: the flag's, without "--"
            raise ConfigError(f"--{error}") from None

    def check(self) -> None:
        """Every check that needs neither data nor torch, before any work starts (raises ConfigError)."""
        check_attack_name(self.attack)
        if self.device not in set(Device) and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be {', '.join(Device)} (or cuda:N), got {self.device!r}")
        for name, declared in DECLARED.items():  # the bounds each setting declares
            value = getattr(self, name)
            problem = None if value is None else declared.violation(flag_of(name), value)
            if problem:
                raise ConfigError(problem)
        if self.max_shard and self.max_shard < self.min_shard:
            raise ConfigError(f"--max-shard {self.max_shard} is below --min-shard {self.min_shard}")
        self.training  # noqa: B018 (raises ConfigError for a bad training setting)
        check_attack(self.attack, self.model, self.attack_async, self.imprint_rows, self.imprint_blocks)
        self.check_rows()
        if self.proximal_mu and self.strategy != StrategyName.FEDPROX:
            raise ConfigError(f"--proximal-mu is FedProx's: use it with --strategy fedprox, not {self.strategy}")
        outside = [c for c in self.attack_clients or () if not 0 <= c < self.num_clients]
        if outside:
            raise ConfigError(f"--attack-clients {outside} are not clients 0..{self.num_clients - 1}")
        outside = sorted(c for c in self.inject_faults if not 0 <= c < self.num_clients)
        if outside:
            raise ConfigError(f"--inject-faults names {outside}, not clients 0..{self.num_clients - 1}")
        check_privacy(self.defense, self.model, self.proximal_mu)
        if self.attack_clients is not None and self.defense.secure_aggregation:
            raise ConfigError("--attack-clients cannot pick clients under secure aggregation: the server "
                              "sees only their sum, so leave it out")
        if self.defense.protocol:
            check_secagg(self.num_clients, self.fraction_train, self.secagg_shares, self.secagg_threshold,
                         self.secagg_quantization_range)


FIELD_TYPES = typing.get_type_hints(RunConfig)
DECLARED: dict[str, Setting] = {spec.name: spec.metadata[SETTING] for spec in fields(RunConfig)
                                if SETTING in spec.metadata}
# the optional counts whose None is written as 0 (restarts, label deals: the attack preset's)
ZERO_IS_NONE = tuple(name for name, declared in DECLARED.items() if declared.zero is not None)


def flower_key(name: str) -> str:
    """Field `name`'s key in Flower's run config: its declared `flower_key`, else the name with hyphens."""
    declared = DECLARED.get(name)
    if declared is not None and declared.flower_key is not None:
        return declared.flower_key
    return name.replace("_", "-")
