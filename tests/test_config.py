"""Tests of config loading, validation and the CLI's handling of invalid configs.

Every invalid config must give one ``ConfigError`` whose message names the key path, the value
and the allowed values or the fix. The CLI prints that message as one line on standard error,
prefixed with ``fedsim: error:``, and exits with status 2. Expected messages are written out by
hand from the rule each case breaks.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsim import cli
from fedsim.config import ClientSection, ConfigError, DataSection, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))

# The data sets and partitioners the design names, in the order the schema lists them.
DATASET_LIST = "digits, breast_cancer, wine, iris, synthetic, mnist, fashion_mnist, cifar10, cifar100"
SECTION_LIST = "run, data, model, strategy, client, backend"
STRATEGY_KEYS = "name, fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes"


@dataclass(frozen=True)
class BadConfig:
    """An invalid YAML text (or override list) and the message it must give.

    ``message`` is the whole message, or its start when ``whole`` is false (where the rest is a
    list that other strategies or sections may extend).
    """

    name: str
    text: str
    message: str
    overrides: tuple[str, ...] = ()
    whole: bool = True


BAD_CONFIGS = [
    BadConfig(
        "misspelt_section",
        "runn: {rounds: 2}\n",
        f"unknown config key 'runn' (did you mean 'run'?). Valid keys at the top level: {SECTION_LIST}",
        whole=False,
    ),
    BadConfig(
        "misspelt_strategy_key",
        "strategy: {fracton_train: 0.5}\n",
        "unknown config key 'strategy.fracton_train' (did you mean 'fraction_train'?). "
        f"Valid keys under 'strategy': {STRATEGY_KEYS}",
        whole=False,
    ),
    BadConfig(
        "misspelt_partitioner_key",
        "data: {partitioner: {name: dirichlet, alpah: 0.1}}\n",
        "unknown config key 'data.partitioner.alpah' (did you mean 'alpha'?). "
        "Valid keys under 'data.partitioner': name, alpha, min_partition_size, classes_per_client",
    ),
    BadConfig(
        "rounds_not_integer",
        "run: {rounds: abc}\n",
        "invalid value for 'run.rounds': Value 'abc' of type 'str' could not be converted to Integer",
    ),
    BadConfig(
        "rounds_override_not_integer",
        "",
        "invalid value for 'run.rounds': Value 'abc' of type 'str' could not be converted to Integer",
        overrides=("run.rounds=abc",),
    ),
    BadConfig(
        "fraction_above_one",
        "strategy: {fraction_train: 1.5}\n",
        "invalid value for 'strategy.fraction_train': 1.5; expected a number in [0, 1]",
    ),
    BadConfig(
        "negative_rounds",
        "run: {rounds: -1}\n",
        "invalid value for 'run.rounds': -1; expected an integer >= 1",
    ),
    BadConfig(
        "unknown_dataset",
        "data: {dataset: mnsit}\n",
        f"invalid value for 'data.dataset': 'mnsit' (did you mean 'mnist'?). Allowed: {DATASET_LIST}",
    ),
    BadConfig(
        "unknown_partitioner",
        "data: {partitioner: {name: dirichlett}}\n",
        "invalid value for 'data.partitioner.name': 'dirichlett' (did you mean 'dirichlet'?). "
        "Allowed: iid, dirichlet, shards",
    ),
    BadConfig(
        "unknown_model",
        "model: {name: lenet}\n",
        "invalid value for 'model.name': 'lenet' (did you mean 'lenet5'?). Allowed: conv4, lenet5, logreg, mlp",
    ),
    BadConfig(
        "unknown_strategy",
        "strategy: {name: fedavgg}\n",
        "invalid value for 'strategy.name': 'fedavgg' (did you mean 'fedavg'?). Allowed: ",
        whole=False,
    ),
    BadConfig(
        "min_train_nodes_above_clients",
        "data: {num_clients: 20}\nstrategy: {min_train_nodes: 30}\n",
        "invalid value for 'strategy.min_train_nodes': 30; "
        "expected at most data.num_clients (20); a larger minimum waits forever",
    ),
    BadConfig(
        "file_dataset_without_root",
        "data: {dataset: mnist}\nmodel: {name: lenet5}\n",
        "invalid value for 'data.root': None; "
        "expected the folder holding the mnist files (data set 'mnist' is read from disk)",
    ),
    BadConfig(
        "test_fraction_one",
        "data: {test_fraction: 1.0}\n",
        "invalid value for 'data.test_fraction': 1.0; expected a number in (0, 1)",
    ),
    BadConfig(
        "test_fraction_zero",
        "data: {test_fraction: 0.0}\n",
        "invalid value for 'data.test_fraction': 0.0; expected a number in (0, 1)",
    ),
    BadConfig(
        "unknown_optimizer",
        "client: {optimizer: sdg}\n",
        "invalid value for 'client.optimizer': 'sdg' (did you mean 'sgd'?). Allowed: sgd, adam",
    ),
    BadConfig(
        "negative_lr",
        "client: {lr: -0.1}\n",
        "invalid value for 'client.lr': -0.1; expected a learning rate > 0",
    ),
    BadConfig(
        # YAML reads 0 as an int, which the float field stores as 0.0.
        "dirichlet_alpha_zero",
        "data: {partitioner: {name: dirichlet, alpha: 0}}\n",
        "invalid value for 'data.partitioner.alpha': 0.0; expected a number > 0",
    ),
    BadConfig(
        "address_with_local_backend",
        "backend: {name: local, address: 'ray://10.0.0.1:10001'}\n",
        "'backend.address' is set to 'ray://10.0.0.1:10001' but 'backend.name' is 'local'; "
        "a cluster address needs backend.name=ray",
    ),
    BadConfig(
        "override_without_equals",
        "",
        "invalid override 'run.rounds': write key=value, e.g. run.rounds=5",
        overrides=("run.rounds",),
    ),
]


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return str(caught.value)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``fedsim.cli.main`` in this process; return the exit status, stdout and stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_message(actual: str, case: BadConfig) -> None:
    if case.whole:
        assert actual == case.message
    else:
        assert actual.startswith(case.message), actual


# --- load_config ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=lambda case: case.name)
def test_load_config_rejects(case: BadConfig, tmp_path: Path) -> None:
    path = write_config(tmp_path, case.text)

    message = config_error(path, case.overrides)

    assert_message(message, case)


def test_load_config_lists_strategies(tmp_path: Path) -> None:
    path = write_config(tmp_path, "strategy: {name: fedavgg}\n")

    message = config_error(path)

    allowed = message.split("Allowed: ", 1)[1].split(", ")
    assert "fedavg" in allowed
    assert "local" in allowed


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    message = config_error(path)

    assert message == f"config file not found: {str(path)!r}; pass the path of a YAML file"


def test_load_config_invalid_yaml(tmp_path: Path) -> None:
    # The flow mapping opened on line 1 is never closed.
    path = write_config(tmp_path, "run: {rounds: 2\n")

    message = config_error(path)

    assert message.startswith(f"config file {str(path)!r} is not valid YAML: ")
    assert "line 1" in message


def test_load_config_yaml_list(tmp_path: Path) -> None:
    path = write_config(tmp_path, "- run\n- data\n")

    message = config_error(path)

    assert message == f"config file {str(path)!r} must hold a mapping of sections"


def test_unknown_key_without_match_punctuated(tmp_path: Path) -> None:
    path = write_config(tmp_path, "zzz: 1\n")

    message = config_error(path)

    # A punctuation mark must end the clause that names the key before the valid keys follow.
    assert re.match(r"unknown config key 'zzz'[.;:] ", message), message


def test_unknown_choice_without_match_punctuated(tmp_path: Path) -> None:
    path = write_config(tmp_path, "data: {dataset: qqqqq}\n")

    message = config_error(path)

    assert re.match(r"invalid value for 'data.dataset': 'qqqqq'[.;:] ", message), message


def test_override_empty_segment_named(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, ""), ("run..rounds=3",))

    assert "run..rounds" in message
    assert "did you mean 'run'" not in message


# --- valid configs, overrides and defaults ---------------------------------------------------


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_shipped_config_validates(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # File data sets need data.root on the command line. validate does not read the files, so a
    # folder that does not exist passes, and digits ignores the setting.
    root = tmp_path / "absent"

    code, out, err = run_cli(["validate", str(path), f"data.root={root}"], capsys)

    assert code == 0, err
    assert out.startswith(f"{path}: valid (")
    assert err == ""


def test_configs_folder_not_empty() -> None:
    assert CONFIG_FILES, "no YAML file found in configs/"


def test_file_dataset_root_not_read(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"data: {{dataset: mnist, root: {tmp_path / 'absent'}}}\nmodel: {{name: lenet5}}\n")

    config = load_config(path)

    assert config.data.root == str(tmp_path / "absent")


def test_overrides_win_over_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "run: {rounds: 20}\nstrategy: {fraction_train: 0.5}\n")

    config = load_config(path, ["run.rounds=3", "strategy.fraction_train=0.2"])

    assert config.run.rounds == 3
    assert config.strategy.fraction_train == 0.2


def test_later_override_wins(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, ""), ["run.rounds=3", "run.rounds=4"])

    assert config.run.rounds == 4


def test_defaults_fill_missing_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, "run: {rounds: 3}\ndata: {num_clients: 5}\n")

    config = load_config(path)

    assert config.run.rounds == 3
    assert config.run.seed == 0
    assert config.data.num_clients == 5
    # The rest of the data section keeps the schema's defaults: digits, test fraction 0.2.
    assert config.data.dataset == "digits"
    assert config.data.test_fraction == 0.2
    assert config.data.partitioner == DataSection().partitioner
    assert config.client == ClientSection()
    assert config.strategy.name == "fedavg"
    assert config.backend.name == "ray"


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    from_file = load_config(write_config(tmp_path, ""))
    from_nothing = load_config(None)

    assert from_file == from_nothing


# --- the CLI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=lambda case: case.name)
def test_cli_validate_rejects(case: BadConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, case.text)

    code, out, err = run_cli(["validate", str(path), *case.overrides], capsys)

    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("fedsim: error: ")
    assert_message(err.removeprefix("fedsim: error: ").rstrip("\n"), case)


def test_cli_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.yaml"

    code, _, err = run_cli(["validate", str(path)], capsys)

    assert code == 2
    assert err == f"fedsim: error: config file not found: {str(path)!r}; pass the path of a YAML file\n"


def test_cli_validate_yaml_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "- run\n")

    code, _, err = run_cli(["validate", str(path)], capsys)

    assert code == 2
    assert err == f"fedsim: error: config file {str(path)!r} must hold a mapping of sections\n"


def test_cli_invalid_yaml_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "run: {rounds: 2\n")

    code, _, err = run_cli(["validate", str(path)], capsys)

    assert code == 2
    assert err.count("\n") == 1, err


def test_cli_validate_without_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["validate"], capsys)

    assert code == 2
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


def test_cli_validate_names_only_config(capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run_cli(["validate"], capsys)

    # Only the config path is required; overrides may be left out.
    assert "required: config (" in err, err


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_module_validate_misspelt_key(tmp_path: Path) -> None:
    write_config(tmp_path, "strategy: {fracton_train: 0.5}\n")

    result = run_module("validate", "config.yaml", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "fedsim: error: unknown config key 'strategy.fracton_train' (did you mean 'fraction_train'?). "
    )
    assert result.stderr.count("\n") == 1, result.stderr


def test_module_validate_bad_override(tmp_path: Path) -> None:
    write_config(tmp_path, "run: {rounds: 2}\n")

    result = run_module("validate", "config.yaml", "run.rounds=-3", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr == "fedsim: error: invalid value for 'run.rounds': -3; expected an integer >= 1\n"


def test_module_validate_missing_file(tmp_path: Path) -> None:
    result = run_module("validate", "absent.yaml", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr == "fedsim: error: config file not found: 'absent.yaml'; pass the path of a YAML file\n"


# --- simulate with a model that does not fit the data ---------------------------------------


# digits are 8x8 grayscale images, shape (1, 8, 8); LeNet-5 needs (1, 28, 28).
LENET_ON_DIGITS = (
    "invalid value for 'model.name': 'lenet5' needs inputs of shape (1, 28, 28), "
    "but data set 'digits' gives (1, 8, 8); pick a data set of that shape or another model"
)


@dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str
    output_dir: Path


@pytest.fixture(scope="module")
def lenet_on_digits(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """Run ``simulate`` once with LeNet-5 on digits, with the default progress display on."""
    folder = tmp_path_factory.mktemp("lenet")
    path = write_config(folder, "model: {name: lenet5}\n")
    output_dir = folder / "runs"
    out, err = io.StringIO(), io.StringIO()
    argv = ["simulate", str(path), "backend.name=local", "run.rounds=1", f"run.output_dir={output_dir}"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return CliRun(code, out.getvalue(), err.getvalue(), output_dir)


def test_simulate_model_mismatch_exits_2(lenet_on_digits: CliRun) -> None:
    assert lenet_on_digits.code == 2


def test_simulate_model_mismatch_names_fix(lenet_on_digits: CliRun) -> None:
    first_line = lenet_on_digits.err.splitlines()[0]

    assert first_line == f"fedsim: error: {LENET_ON_DIGITS}"
    assert "Traceback" not in lenet_on_digits.err


def test_simulate_model_mismatch_one_line(lenet_on_digits: CliRun) -> None:
    assert lenet_on_digits.err == f"fedsim: error: {LENET_ON_DIGITS}\n"


def test_simulate_model_mismatch_writes_nothing(lenet_on_digits: CliRun) -> None:
    left = sorted(lenet_on_digits.output_dir.rglob("*")) if lenet_on_digits.output_dir.exists() else []

    assert left == []


def test_simulate_model_mismatch_no_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "model: {name: lenet5}\n")
    argv = [
        "simulate", str(path), "backend.name=local", "run.rounds=1", "run.progress=false",
        f"run.output_dir={tmp_path / 'runs'}",
    ]

    code, out, err = run_cli(argv, capsys)

    assert code == 2
    assert out == ""
    assert err == f"fedsim: error: {LENET_ON_DIGITS}\n"


def test_misspelt_key_in_fault_entry_named() -> None:
    from fedsim.config import ConfigError, load_config

    with pytest.raises(ConfigError) as caught:
        load_config(None, ["faults=[{kind: raise, round: [2], partitions: [3]}]"])

    assert str(caught.value) == (
        "unknown config key 'faults[].round' (did you mean 'rounds'?). "
        "Valid keys under 'faults[]': kind, rounds, partitions, phase, seconds"
    )
