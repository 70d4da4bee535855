"""RunConfig declares every setting once: the flags of `fl-sim run` / `fl-sim attack`, their defaults, bounds and
Flower keys come from its fields, and pyproject.toml's `[tool.flwr.app.config]` holds the same defaults."""
import argparse
import dataclasses
import tomllib
from pathlib import Path

import pytest

from fl_sim.commands import cli
from fl_sim.commands import run as run_module
from fl_sim.commands.config import TASK_DEFAULTS, task_config
from fl_sim.contract.models import model_names
from fl_sim.contract.names import DatasetName, Device, PartitionScheme
from fl_sim.contract.run_config import DECLARED, FIELD_TYPES, ZERO_IS_NONE, RunConfig, flower_key
from fl_sim.contract.setting import ConfigError, flag_of

ROOT = Path(__file__).resolve().parents[1]
HAND_WRITTEN = {"attack"}  # its flag lists the attack registry's names (fl_sim/commands/config.py)


def pyproject_run_config() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["tool"]["flwr"]["app"]["config"]


def test_pyprojects_run_config_defaults_are_run_configs():
    table, defaults = pyproject_run_config(), RunConfig().to_flower()
    assert sorted(set(defaults) - set(table)) == [], "settings without a key in pyproject.toml"
    assert sorted(set(table) - set(defaults)) == [], "keys in pyproject.toml that are no setting"
    differing = {key: (table[key], value) for key, value in defaults.items()
                 if table[key] != value or type(table[key]) is not type(value)}
    assert differing == {}, "pyproject.toml value, RunConfig default"


def test_every_field_is_declared_and_is_a_flag_of_fl_sim_run():
    fields = {spec.name for spec in dataclasses.fields(RunConfig)}
    assert set(DECLARED) == fields - HAND_WRITTEN
    run_parser = argparse.ArgumentParser()
    run_module.add_arguments(run_parser)
    flags = {option for action in run_parser._actions for option in action.option_strings}
    assert {flag_of(name) for name in fields} <= flags


def test_the_flags_defaults_are_run_configs_and_the_tasks():
    """No flag given: `fl-sim run` gets RunConfig(), `fl-sim attack` (and the sweeps) the research setting."""
    run_args = cli.parse_args(["run"])
    assert run_args.out is None  # --out or --resume: the command line has no default folder
    assert run_module.config_from_flags(run_args, run_module.FIELD_NAMES - {"out"}) == RunConfig()

    attack_args = cli.parse_args(["attack", "--out", "o"])
    task = task_config(attack_args)
    # the research setting: one image a step, DLG's LeNet, plain SGD at 0.1, iDLG; the rest as fl-sim run's
    assert (task.model, task.batch_size, task.train_mode) == ("lenet", 1, "steps")
    assert (task.epochs, task.lr, task.momentum, task.attack) == (1, 0.1, 0.0, "idlg")
    for name in ("model", "batch_size", "train_mode", "epochs", "lr", "momentum", "attack"):
        assert getattr(task, name) == getattr(TASK_DEFAULTS, name), name
    for name in ("dataset", "init", "local_steps", "defense", "iterations", "restarts",
                 "tv_weight", "bn_statistics", "imprint_bins", "imprint_blocks", "device", "seed"):
        assert getattr(task, name) == getattr(TASK_DEFAULTS, name) == getattr(RunConfig(), name), name

    sweep = cli.parse_args(["sweep", "--grid", "lr=0.1"])
    assert (sweep.model, sweep.batch_size, sweep.train_mode) == ("lenet", 1, "steps")
    assert (sweep.epochs, sweep.lr, sweep.momentum, sweep.attack) == (1, 0.1, 0.0, "idlg")
    assert (sweep.min_shard, sweep.max_shard) == (1, 0)  # whole partitions in run mode


def test_help_lists_the_enums_names_and_the_commands_default(capsys):
    for argv, model in ((["run", "--help"], "cnn"), (["attack", "--help"], "lenet"), (["sweep", "--help"], "lenet")):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert f"one of {', '.join(model_names())} (default {model})" in text
        assert f"one of {', '.join(DatasetName)} (default mnist)" in text
        assert ", ".join(Device) in text
        if argv[0] != "attack":
            assert "{" + ",".join(PartitionScheme) + "}" in text


def bound_cases():
    """(field, a value just inside its declared bounds, one just outside) for every declared bound."""
    for name, declared in DECLARED.items():
        integral = isinstance(getattr(RunConfig(), name), int) or name in ZERO_IS_NONE
        step = 1 if integral else 0.5
        if declared.least is not None:  # restarts 0 reads as None ("the preset's"), so -1 is its first outside
            yield name, declared.least, declared.least - step - (name in ZERO_IS_NONE)
        if declared.above is not None:
            yield name, declared.most if declared.most is not None else declared.above + step, declared.above
        if declared.most is not None:
            yield name, declared.most, declared.most + step


@pytest.mark.parametrize("name,inside,outside", list(bound_cases()))
def test_checks_read_each_settings_declared_bounds(name, inside, outside):
    RunConfig.from_values({name: inside}).check()
    with pytest.raises(ConfigError, match=f"^{flag_of(name)} must be "):
        RunConfig.from_values({name: outside}).check()


def test_the_declared_bounds_cover_the_counts():
    bounded = {name for name, declared in DECLARED.items() if (declared.least, declared.above) != (None, None)}
    assert {"rounds", "num_clients", "iterations", "attack_every", "seed", "min_shard", "max_shard",
            "max_attack_images", "imprint_bins", "imprint_blocks", "restarts", "label_deals", "tv_weight",
            "bn_statistics", "alpha", "server_lr", "fraction_train", "secagg_shares", "secagg_threshold",
            "secagg_clipping_range", "secagg_quantization_range", "secagg_max_weight", "secagg_timeout",
            "secagg_in_flight"} == bounded


def test_a_value_outside_the_bounds_is_one_line_and_exit_2_before_any_work(tmp_path, capsys):
    assert cli.main(["run", "--rounds", "0", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "fl-sim run: --rounds must be at least 1, got 0"
    assert cli.main(["run", "--fraction-train", "1.5", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "fl-sim run: --fraction-train must be in (0, 1], got 1.5"
    assert cli.main(["run", "--device", "tpu", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "fl-sim run: --device must be auto, cpu, cuda (or cuda:N), got 'tpu'"
    assert not (tmp_path / "run").exists()


def test_named_settings_are_enums_and_a_gpu_may_be_named():
    config = RunConfig.from_flower({"dataset": "cifar10", "model": "mlp", "partition": "dirichlet", "device": "cuda:1"})
    assert (config.dataset, config.model, config.partition) == (DatasetName.CIFAR10, "mlp",
                                                                PartitionScheme.DIRICHLET)
    config.check()
    with pytest.raises(ConfigError, match="^unknown partition 'shards': choose one of iid, dirichlet$"):
        RunConfig.from_flower({"partition": "shards"})


def test_the_two_flower_keys_that_differ_are_declared():
    keys = RunConfig().to_flower()
    assert "num-server-rounds" in keys and "out-dir" in keys and "rounds" not in keys
    assert RunConfig.from_flower({"num-server-rounds": 5, "out-dir": "o"}) == RunConfig(rounds=5, out="o")
    assert run_module.RESUMABLE_ELSEWHERE == ("data_root", "attack_async", "device")


def test_an_optional_counts_zero_is_declared_shown_in_help_and_in_its_error(tmp_path, capsys):
    """Flower's run config has no null, so an optional count's None (the attack preset's) is written 0: each such
    setting declares what 0 means, --help says it, and a value below the bounds is refused naming it."""
    optional_counts = {name for name, kind in FIELD_TYPES.items() if kind == int | None}
    assert optional_counts == set(ZERO_IS_NONE) == {"restarts", "label_deals"}
    with pytest.raises(SystemExit):
        cli.parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "random restarts per victim (0, the default: the preset's)" in text
    assert "(0, the default: the preset's, 8)" in text
    for name in ZERO_IS_NONE:
        assert RunConfig.from_values({name: 0}) == RunConfig() == RunConfig.from_flower({flower_key(name): 0})
        assert RunConfig().to_flower()[flower_key(name)] == 0
        assert cli.main(["run", flag_of(name), "-1", "--out", str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err.strip() == \
            f"fl-sim run: {flag_of(name)} must be at least 1, or 0 for {DECLARED[name].zero}, got -1"
    assert not (tmp_path / "run").exists()


FLOATS = [name for name in DECLARED if FIELD_TYPES[name] in (float, float | None)]


@pytest.mark.parametrize("name", FLOATS)
def test_every_number_is_finite_from_flags_and_from_flowers_run_config(name, tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"^{flag_of(name)} must be a finite number, got inf$"):
        RunConfig.from_flower({flower_key(name): "inf"}).check()
    with pytest.raises(ConfigError, match=f"^{flag_of(name)} must be a finite number, got nan$"):
        RunConfig.from_values({name: float("nan")}).check()
    assert cli.main(["run", flag_of(name), "inf", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"fl-sim run: {flag_of(name)} must be a finite number, got inf"
    assert not (tmp_path / "run").exists()


def test_a_sweeps_grid_keeps_the_declared_bounds_before_any_point_runs(tmp_path, capsys):
    for grid, said in (("alpha=0.5,inf", "--alpha must be a finite number, got inf"),
                       ("restarts=1,-1", "--restarts must be at least 1, or 0 for the preset's, got -1")):
        assert cli.main(["sweep", "--mode", "run", "--grid", grid, "--out", str(tmp_path / "sweep")]) == 2
        assert capsys.readouterr().err.strip().endswith(said)
        assert not (tmp_path / "sweep" / "points").exists()


def test_coercion_reads_the_declared_type_or_parser_never_the_field_name():
    """The same value reads alike under any field of one declared type: a grammar's class parses it, an
    optional count's 0 is None only where its Setting declares `zero`, and a Setting's own parser decides for a
    type coercion cannot read alone (a client list)."""
    from fl_sim.contract.defenses import DefenseSpec, ServerDp
    from fl_sim.contract.setting import Group, Setting, coerce, parse_client_list

    assert coerce(DefenseSpec, None, "clip:4+noise:0.1", "--any") == DefenseSpec.parse("clip:4+noise:0.1")
    assert coerce(ServerDp, None, ServerDp(), "--any") == ServerDp()
    assert coerce(int | None, Setting("h", Group.ATTACK, zero="the preset's"), 0, "--any") is None
    assert coerce(int | None, Setting("h", Group.ATTACK), 0, "--any") == 0
    listed = Setting("h", Group.FEDERATION, parse=parse_client_list)
    assert coerce(tuple[int, ...] | None, listed, "2,0", "--any") == (0, 2)
    assert coerce(tuple[int, ...] | None, listed, "all", "--any") is None
    with pytest.raises(ConfigError, match="^--any must be an integer, got '1.5'$"):
        coerce(int, None, "1.5", "--any")
