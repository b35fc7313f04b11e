"""The run configuration: a typed schema with defaults, YAML merged over it, overrides last.

The schema is a tree of dataclasses used as OmegaConf structured configs, so a misspelt key or a
value of the wrong type fails at load time with the key path. Ranges and allowed values are
checked by :func:`validate`, which runs before anything starts. Each strategy has its own
``strategy:`` section, a subclass of :class:`StrategySection` registered with
:func:`register_strategy_section`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    "BackendSection",
    "ClientResources",
    "ClientSection",
    "ConfigError",
    "DataSection",
    "FaultSection",
    "ModelSection",
    "PartitionerSection",
    "RunConfig",
    "RunSection",
    "StrategySection",
    "SyntheticSection",
    "check_choice",
    "check_value",
    "load_config",
    "register_strategy_section",
    "strategy_sections",
    "to_yaml",
    "validate",
]

DATASETS = (
    "digits",
    "breast_cancer",
    "wine",
    "iris",
    "synthetic",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
)
FILE_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
PARTITIONERS = ("iid", "dirichlet", "shards")
OPTIMIZERS = ("sgd", "adam")
BACKENDS = ("ray", "local")


class ConfigError(ValueError):
    """An invalid configuration: the message names the key path, the value and the fix."""


@dataclass
class RunSection:
    """Run-wide settings: name, root seed, rounds and where results go."""

    name: str = "fedsim"
    seed: int = 0
    rounds: int = 10
    output_dir: str = "runs"
    checkpoint_every: int = 0
    progress: bool = True


@dataclass
class PartitionerSection:
    """The partitioner that splits the data set across clients."""

    name: str = "iid"
    alpha: float = 0.5
    min_partition_size: int = 10
    classes_per_client: int = 2


@dataclass
class SyntheticSection:
    """Generated data with a known ground truth, used when ``data.dataset`` is ``synthetic``."""

    task: str = "classification"
    num_samples: int = 2000
    num_features: int = 20
    num_classes: int = 4
    noise: float = 0.1


@dataclass
class DataSection:
    """The data set, where its files are, and how it is partitioned."""

    dataset: str = "digits"
    root: str | None = None
    num_clients: int = 20
    test_fraction: float = 0.2
    max_samples: int | None = None
    partitioner: PartitionerSection = field(default_factory=PartitionerSection)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)


@dataclass
class ModelSection:
    """The model from the zoo; ``hidden`` sets the widths of ``mlp``."""

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [128, 64])


@dataclass
class StrategySection:
    """Keys every strategy accepts. Strategies add their own keys in a subclass."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 1
    min_evaluate_nodes: int = 1
    max_failure_fraction: float = 0.2
    round_timeout_s: float = 600.0
    centralized_evaluation: bool = True


@dataclass
class ClientSection:
    """Local training on each client."""

    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class ClientResources:
    """Resources Ray reserves for each client; concurrency is CPUs / num_cpus."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class BackendSection:
    """The engine that runs the clients, and its resources."""

    name: str = "ray"
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    client_resources: ClientResources = field(default_factory=ClientResources)


@dataclass
class FaultSection:
    """One injected fault: ``kind`` hits ``partitions`` in ``rounds`` during ``phase``."""

    kind: str = "raise"
    rounds: list[int] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    phase: str = "train"
    seconds: float = 0.0


@dataclass
class RunConfig:
    """A whole run: the six sections of a fedsim YAML file."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    client: ClientSection = field(default_factory=ClientSection)
    backend: BackendSection = field(default_factory=BackendSection)
    faults: list[FaultSection] = field(default_factory=list)


_STRATEGY_SECTIONS: dict[str, type[StrategySection]] = {}


def register_strategy_section(name: str, section: type[StrategySection]) -> None:
    """Register the ``strategy:`` schema of strategy ``name``."""
    if not (is_dataclass(section) and issubclass(section, StrategySection)):
        raise TypeError(f"{section!r} must be a dataclass subclass of StrategySection")
    _STRATEGY_SECTIONS[name] = section


def strategy_sections() -> dict[str, type[StrategySection]]:
    """Return the registered strategy schemas by name, loading the built-in methods first."""
    import fedsim.methods  # noqa: F401  (registers the built-in strategies)

    return dict(_STRATEGY_SECTIONS)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _node_keys(config: DictConfig, path: str) -> list[str]:
    node: Any = config
    for part in [p for p in path.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _translate(error: OmegaConfBaseException, schema: DictConfig) -> ConfigError:
    full_key = str(getattr(error, "full_key", "") or "")
    if isinstance(error, ConfigKeyError):
        parent, _, key = full_key.rpartition(".")
        valid = _node_keys(schema, parent)
        object_type = getattr(error, "object_type", None)
        if not parent and is_dataclass(object_type) and object_type is not RunConfig:
            # Inside a list (the faults entries) OmegaConf reports the bare key.
            parent = "faults[]" if object_type is FaultSection else object_type.__name__
            valid = [f.name for f in fields(object_type)]
            full_key = f"{parent}.{key}"
        where = f"under {parent!r}" if parent else "at the top level"
        return ConfigError(
            f"unknown config key {full_key!r}{_suggest(key, valid)}. "
            f"Valid keys {where}: {', '.join(valid)}"
        )
    if isinstance(error, ValidationError) and full_key:
        reason = str(getattr(error, "msg", error)).splitlines()[0]
        return ConfigError(f"invalid value for {full_key!r}: {reason}")
    reason = str(getattr(error, "msg", error)).splitlines()[0]
    if not full_key:
        return ConfigError(f"invalid config: {reason}; a section was given a single value, e.g. write data.partitioner.name=dirichlet, not data.partitioner=dirichlet")
    return ConfigError(f"invalid config at {full_key!r}: {reason}")


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}; pass the path of a YAML file")
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and OmegaConf errors carry the line
        reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {reason}") from error
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"invalid override {item!r}: write key=value, e.g. run.rounds=5")
        key = item.split("=", 1)[0]
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"invalid override {item!r}: the key {key!r} has an empty part; write e.g. run.rounds=5")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid override: {str(error).splitlines()[0]}") from error


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run config: schema defaults, then the YAML file, then ``key=value`` overrides.

    Raises :class:`ConfigError` with the key path, the value and the allowed values for an
    unknown key, a wrong type or a value out of range.
    """
    loaded = _read_yaml(Path(path)) if path is not None else OmegaConf.create({})
    override_config = _parse_overrides(overrides)
    untyped = OmegaConf.merge(loaded, override_config)

    strategy_name = OmegaConf.select(untyped, "strategy.name", default="fedavg")
    sections = strategy_sections()
    if strategy_name not in sections:
        raise ConfigError(
            f"invalid value for 'strategy.name': {strategy_name!r}{_suggest(str(strategy_name), list(sections))}. "
            f"Allowed: {', '.join(sorted(sections))}"
        )

    schema = OmegaConf.structured(RunConfig(strategy=sections[strategy_name]()))
    try:
        merged = OmegaConf.merge(schema, loaded, override_config)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _translate(error, schema) from error
    except (TypeError, ValueError) as error:  # OmegaConf raises these for a list given as a mapping
        raise ConfigError(
            f"invalid config: {error}; a section or key was given a value of the wrong shape, "
            "e.g. 'faults' takes a list of {kind, rounds, partitions} and 'data.partitioner' a mapping "
            "(write data.partitioner.name=dirichlet)"
        ) from error
    assert isinstance(config, RunConfig)
    validate(config)
    return config


def check_value(condition: bool, key: str, value: object, expected: str) -> None:
    """Raise :class:`ConfigError` naming ``key``, ``value`` and ``expected`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"invalid value for {key!r}: {value!r}; expected {expected}")


def check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    """Raise :class:`ConfigError` with the allowed values (and a close match) unless ``value`` is one."""
    if value not in allowed:
        raise ConfigError(
            f"invalid value for {key!r}: {value!r}{_suggest(value, allowed)}. "
            f"Allowed: {', '.join(allowed)}"
        )


def _check_fraction(key: str, value: float, *, allow_zero: bool = True) -> None:
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    bound = "[0, 1]" if allow_zero else "(0, 1]"
    check_value(math.isfinite(value) and low_ok and value <= 1.0, key, value, f"a number in {bound}")


_DATASET_SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "breast_cancer": (30,),
    "wine": (13,),
    "iris": (4,),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}


def _dataset_shape(data: DataSection) -> tuple[int, ...] | None:
    if data.dataset == "synthetic":
        return (data.synthetic.num_features,)
    return _DATASET_SHAPES.get(data.dataset)


def validate(config: RunConfig) -> None:
    """Check ranges, allowed values and combinations of ``config``; raise :class:`ConfigError`."""
    run, data, model = config.run, config.data, config.model
    strategy, client, backend = config.strategy, config.client, config.backend
    from fedsim.models import MODELS

    check_value(run.rounds >= 1, "run.rounds", run.rounds, "an integer >= 1")
    check_value(run.seed >= 0, "run.seed", run.seed, "an integer >= 0")
    check_value(run.checkpoint_every >= 0, "run.checkpoint_every", run.checkpoint_every, "an integer >= 0 (0 turns checkpoints off)")
    check_value(bool(run.name.strip()), "run.name", run.name, "a non-empty name")
    check_value("/" not in run.name, "run.name", run.name, "a name without '/'")

    check_choice("data.dataset", data.dataset, DATASETS)
    check_value(data.num_clients >= 1, "data.num_clients", data.num_clients, "an integer >= 1")
    check_value(0.0 < data.test_fraction < 1.0, "data.test_fraction", data.test_fraction, "a number in (0, 1)")
    if data.max_samples is not None:
        check_value(data.max_samples >= data.num_clients, "data.max_samples", data.max_samples, f"null or at least data.num_clients ({data.num_clients})")
    if data.dataset in FILE_DATASETS:
        check_value(data.root is not None, "data.root", data.root, f"the folder holding the {data.dataset} files (data set {data.dataset!r} is read from disk)")
    partitioner = data.partitioner
    check_choice("data.partitioner.name", partitioner.name, PARTITIONERS)
    if partitioner.name == "dirichlet":
        check_value(partitioner.alpha > 0 and math.isfinite(partitioner.alpha), "data.partitioner.alpha", partitioner.alpha, "a number > 0")
        check_value(partitioner.min_partition_size >= 0, "data.partitioner.min_partition_size", partitioner.min_partition_size, "an integer >= 0")
    if partitioner.name == "shards":
        check_value(partitioner.classes_per_client >= 1, "data.partitioner.classes_per_client", partitioner.classes_per_client, "an integer >= 1")
    synthetic = data.synthetic
    check_choice("data.synthetic.task", synthetic.task, ("classification", "regression"))
    check_value(data.dataset != "synthetic" or synthetic.num_samples >= data.num_clients * 2, "data.synthetic.num_samples", synthetic.num_samples, f"at least 2 per client ({data.num_clients * 2})")
    check_value(synthetic.num_features >= 1, "data.synthetic.num_features", synthetic.num_features, "an integer >= 1")
    check_value(synthetic.num_classes >= 2, "data.synthetic.num_classes", synthetic.num_classes, "an integer >= 2")
    check_value(synthetic.noise >= 0, "data.synthetic.noise", synthetic.noise, "a number >= 0")

    check_choice("model.name", model.name, sorted(MODELS))
    required = MODELS[model.name].required_shape
    shape = _dataset_shape(data)
    if required is not None and shape is not None and shape != required:
        raise ConfigError(
            f"invalid value for 'model.name': {model.name!r} needs inputs of shape {required}, "
            f"but data set {data.dataset!r} gives {shape}; pick a data set of that shape or another model"
        )
    check_value(all(h >= 1 for h in model.hidden), "model.hidden", list(model.hidden), "a list of positive widths")

    _check_fraction("strategy.fraction_train", strategy.fraction_train)
    _check_fraction("strategy.fraction_evaluate", strategy.fraction_evaluate)
    _check_fraction("strategy.max_failure_fraction", strategy.max_failure_fraction)
    check_value(strategy.min_train_nodes >= 0, "strategy.min_train_nodes", strategy.min_train_nodes, "an integer >= 0")
    check_value(strategy.min_evaluate_nodes >= 0, "strategy.min_evaluate_nodes", strategy.min_evaluate_nodes, "an integer >= 0")
    # A minimum above the number of nodes makes Flower wait for nodes that never connect.
    for key in ("min_train_nodes", "min_evaluate_nodes"):
        value = getattr(strategy, key)
        check_value(value <= data.num_clients, f"strategy.{key}", value, f"at most data.num_clients ({data.num_clients}); a larger minimum waits forever")
    check_value(strategy.round_timeout_s > 0, "strategy.round_timeout_s", strategy.round_timeout_s, "a number of seconds > 0")

    check_value(client.local_epochs >= 1, "client.local_epochs", client.local_epochs, "an integer >= 1")
    check_value(client.batch_size >= 1, "client.batch_size", client.batch_size, "an integer >= 1")
    check_choice("client.optimizer", client.optimizer, OPTIMIZERS)
    check_value(client.lr > 0 and math.isfinite(client.lr), "client.lr", client.lr, "a learning rate > 0")
    check_value(0.0 <= client.momentum < 1.0, "client.momentum", client.momentum, "a number in [0, 1)")
    check_value(client.weight_decay >= 0, "client.weight_decay", client.weight_decay, "a number >= 0")

    check_choice("backend.name", backend.name, BACKENDS)
    resources = backend.client_resources
    check_value(resources.num_cpus > 0, "backend.client_resources.num_cpus", resources.num_cpus, "a number of CPUs > 0")
    check_value(resources.num_gpus >= 0, "backend.client_resources.num_gpus", resources.num_gpus, "a number of GPUs >= 0 (fractions share one GPU)")
    if backend.num_cpus is not None:
        check_value(backend.num_cpus >= 1, "backend.num_cpus", backend.num_cpus, "null or an integer >= 1")
    if backend.address is not None and backend.name != "ray":
        raise ConfigError(f"'backend.address' is set to {backend.address!r} but 'backend.name' is {backend.name!r}; a cluster address needs backend.name=ray")

    for index, fault in enumerate(config.faults):
        key = f"faults[{index}]"
        check_choice(f"{key}.kind", fault.kind, ("raise", "nan", "wrong_shape", "hang", "exit"))
        check_choice(f"{key}.phase", fault.phase, ("train", "evaluate"))
        check_value(all(r >= 1 for r in fault.rounds), f"{key}.rounds", list(fault.rounds), "round numbers >= 1")
        check_value(all(0 <= p < data.num_clients for p in fault.partitions), f"{key}.partitions", list(fault.partitions), f"partition ids in [0, {data.num_clients})")
        if fault.kind == "exit":
            check_value(backend.name == "ray", f"{key}.kind", fault.kind, "'exit' only with backend.name=ray, because the local engine runs clients in the driver process")
        if fault.kind == "hang":
            check_value(fault.seconds > 0, f"{key}.seconds", fault.seconds, "a number of seconds > 0")

    check_strategy = getattr(strategy, "validate", None)
    if callable(check_strategy):
        check_strategy(config)


def to_yaml(config: RunConfig) -> str:
    """Return ``config`` as YAML text, every key written out."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Any) -> dict[str, Any]:
    """Return a dataclass config (or one section of it) as plain nested dicts and lists."""
    result = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    assert isinstance(result, dict)
    return result  # type: ignore[return-value]


def section_fields(section: type) -> list[tuple[str, object]]:
    """Return ``(name, default)`` for every field of a dataclass section, in order."""
    instance = section()
    values = [(f.name, getattr(instance, f.name)) for f in fields(section)]
    return [(name, asdict(value) if is_dataclass(value) else value) for name, value in values]
