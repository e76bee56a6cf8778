"""Run configuration: OmegaConf structured configs plus LightningCLI-style ``class_path``/``init_args`` objects.

Every error names the configuration key, the rule and the value in one line (:class:`ConfigError`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_fedharmony.aggregators.fedharmony import PAPER_SETTINGS
from lightning_fedharmony.rounds import CLIENT_SAMPLING, FEDERATED_EVAL

PARTITIONS = ("dirichlet", "kmeans", "masking", "iid")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass
class DataConfig:
    """Which data, and how to split it.

    Attributes:
        name: ``"river:yeast"`` (shipped with the ``datasets`` extra), a folder name in ``data_dir``, or a path to an
            ``.arff`` (with its ``.xml``), ``.mat`` or ``.npz`` file.
        data_dir: folder of named data sets; default ``$FEDHARMONY_DATA_DIR``, else ``./data``.
        test_size: test share when the data has no official split.
        val_fraction: share of the training data held out for validation (model selection), 0 = none.
        client_val_fraction: share of each client's data held out from its training as the client's own validation
            split (seeded per client); the global model is scored on it every evaluated round, so the history shows
            how well it serves each client. 0 = none (no per-client mAP); the Python API's default is 0.
        standardize: z-score features with the training set's mean and standard deviation.
        top_labels: keep only this many most frequent labels (0 = all).
    """

    name: str = "river:yeast"
    data_dir: str | None = None
    test_size: float = 0.3
    val_fraction: float = 0.0
    client_val_fraction: float = 0.15
    standardize: bool = True
    top_labels: int = 0


@dataclass
class PartitionConfig:
    """How the training data is split over clients.

    Attributes:
        kind: ``"dirichlet"`` (label-set Dirichlet), ``"kmeans"`` (feature k-means), ``"masking"`` (label-space
            masking over an IID split) or ``"iid"``.
        num_clients: number of clients.
        alpha: Dirichlet concentration (``kind="dirichlet"``).
        min_samples: fewest samples per client (Dirichlet, k-means).
        observed_fraction: range of the share of labels each client observes (``kind="masking"``).
    """

    kind: str = "dirichlet"
    num_clients: int = 10
    alpha: float = 0.1
    min_samples: int = 10
    observed_fraction: list[float] = field(default_factory=lambda: [0.5, 0.7])


@dataclass
class FederationConfig:
    """The federation loop (see :class:`~lightning_fedharmony.orchestrator.Federation`).

    Attributes:
        checkpoint_dir: save after every round into ``<checkpoint_dir>/<method>/``; rerunning the same command
            resumes after the last finished round. ``None``: no checkpoints.
        client_timeout: seconds a client may train per round before it counts as failed (``None``: no limit).
        round_retries: retries of a round that got fewer than ``min_clients`` usable updates.
        client_sampling: ``"uniform"`` or ``"size"`` (clients drawn in proportion to their data size).
        federated_eval: each client evaluates the global model on its held-out split (``data.client_val_fraction``)
            and the server merges the states: ``"exact"``, ``"binned"`` (no per-sample score leaves a client) or
            ``"none"``.
        eval_bins: thresholds of the binned average precision.
        fraction_evaluate: share of the clients asked to evaluate each evaluated round (seeded); 1: every client.
        stats_noise_multiplier: Gaussian noise on the clients' exported statistics (0 = off). ``fedharmony serve``
            refuses it: its clients set it on their ``FederatedClient``.
        stats_clip: per-sample L2 bound of the statistics' prediction vectors (``None``: ``sqrt(L)``); the same.
    """

    num_rounds: int = 30
    local_epochs: int = 1
    fraction_fit: float = 1.0
    min_clients: int = 1
    client_sampling: str = "uniform"
    batch_size: int = 64
    eval_every: int = 1
    checkpoint_dir: str | None = None
    client_timeout: float | None = None
    round_retries: int = 0
    federated_eval: str = "exact"
    eval_bins: int = 200
    fraction_evaluate: float = 1.0
    stats_noise_multiplier: float = 0.0
    stats_clip: float | None = None


def _default_model() -> dict[str, Any]:
    return {"class_path": "lightning_fedharmony.models.MultilabelMLP", "init_args": {"hidden": [256], "lr": 1e-3}}


def _default_methods() -> dict[str, Any]:
    return {
        "fedavg": {"class_path": "lightning_fedharmony.FedAvg"},
        "fedprox": {"class_path": "lightning_fedharmony.FedProx", "init_args": {"proximal_mu": 0.001}},
        "fedharmony": {"class_path": "lightning_fedharmony.FedHarmony"},
        # the paper's reading, spelled out so that a YAML shows it: FedHarmony.paper() builds the same object
        "fedharmony_paper": {"class_path": "lightning_fedharmony.FedHarmony", "init_args": dict(PAPER_SETTINGS)},
    }


@dataclass
class RunConfig:
    """A whole run: data, partition, model, the methods to compare, and the federation loop.

    Attributes:
        seed: seeds the split, the partition, the model's initial weights and every client's training.
        out_dir: where results (JSON, CSV, PNG, the resolved config) are written.
        methods: name -> ``{class_path, init_args}`` of an :class:`~lightning_fedharmony.aggregators.Aggregator`;
            all run on the same partition and seed.
        model: ``{class_path, init_args}`` of a LightningModule; ``num_features`` and ``num_labels`` are filled in
            from the data.
        trainer: overrides of the client Trainer template; ``callbacks`` takes ``{class_path, init_args}`` specs (one
            or a list), as in LightningCLI, built once per method and given to every client's Trainer.
        plots: write PNG pictures (needs matplotlib).
        num_threads: torch's intra-op threads for the run (``None``: torch's default). Small models train fastest
            on one thread, and on a busy 2-core machine two threads slowed every step about 50-fold.
    """

    seed: int = 0
    out_dir: str = "fedharmony_runs/latest"
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: dict[str, Any] = field(default_factory=_default_model)
    methods: dict[str, Any] = field(default_factory=_default_methods)
    trainer: dict[str, Any] = field(default_factory=dict)
    plots: bool = True
    num_threads: int | None = 1


def load_config(path: str | os.PathLike[str] | None = None, overrides: typing.Sequence[str] = ()) -> DictConfig:
    """The default :class:`RunConfig`, merged with a YAML file and ``key=value`` dotted overrides, validated.

    Raises:
        ConfigError: a file that does not exist, an unknown key, a value of the wrong type or outside its rule.
    """
    schema = OmegaConf.structured(RunConfig)
    layers: list[Any] = [schema]
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--config: expected an existing YAML file, but {str(file)!r} does not exist.")
        try:
            loaded = OmegaConf.load(file)
        except Exception as err:  # yaml errors have no common base worth importing
            raise ConfigError(f"--config: {str(file)!r} is not valid YAML ({_one_line(err)}).") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"--config: expected a mapping of keys in {str(file)!r}, but got a list.")
        layers.append(loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Expected overrides of the form key=value, but got {item!r}.")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(*layers)
    except (OmegaConfBaseException, TypeError) as err:  # TypeError: a list merged over a mapping (`model=[1]`)
        key = getattr(err, "full_key", None) or _failing_key(schema, layers[1:])
        message = _omegaconf_message(err) if isinstance(err, OmegaConfBaseException) else _one_line(err)
        raise ConfigError(f"{key or 'config'}: {message}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError("Expected the configuration to be a mapping.")
    validate_config(cfg)
    return cfg


def _failing_key(schema: DictConfig, layers: typing.Sequence[Any]) -> str | None:
    """The top-level key whose value alone fails to merge: OmegaConf names no key when a whole section is replaced
    by a value of the wrong kind (``federation=3``)."""
    for layer in layers:
        container = OmegaConf.to_container(layer, resolve=False) if OmegaConf.is_config(layer) else layer
        if not isinstance(container, dict):
            continue
        for key, value in container.items():
            try:
                OmegaConf.merge(schema, {key: value})
            except (OmegaConfBaseException, TypeError) as err:
                return str(getattr(err, "full_key", None) or key)
    return None


def validate_config(cfg: DictConfig) -> None:
    """Value rules that types alone do not express."""
    rules: list[tuple[str, bool, str]] = [
        ("federation.num_rounds", cfg.federation.num_rounds >= 1, "an int >= 1"),
        ("federation.local_epochs", cfg.federation.local_epochs >= 1, "an int >= 1"),
        ("federation.batch_size", cfg.federation.batch_size >= 1, "an int >= 1"),
        ("federation.eval_every", cfg.federation.eval_every >= 1, "an int >= 1"),
        ("federation.fraction_fit", 0 < cfg.federation.fraction_fit <= 1, "in (0, 1]"),
        ("federation.min_clients", cfg.federation.min_clients >= 1, "an int >= 1"),
        (
            "federation.client_sampling",
            cfg.federation.client_sampling in CLIENT_SAMPLING,
            f"one of {CLIENT_SAMPLING}",
        ),
        ("federation.round_retries", cfg.federation.round_retries >= 0, "an int >= 0"),
        (
            "federation.federated_eval",
            cfg.federation.federated_eval in FEDERATED_EVAL,
            f"one of {FEDERATED_EVAL}",
        ),
        ("federation.eval_bins", cfg.federation.eval_bins >= 2, "an int >= 2"),
        ("federation.fraction_evaluate", 0 < cfg.federation.fraction_evaluate <= 1, "in (0, 1]"),
        (
            "federation.client_timeout",
            cfg.federation.client_timeout is None or cfg.federation.client_timeout > 0,
            "null or a float > 0",
        ),
        ("partition.num_clients", cfg.partition.num_clients >= 1, "an int >= 1"),
        ("partition.kind", cfg.partition.kind in PARTITIONS, f"one of {PARTITIONS}"),
        ("partition.alpha", cfg.partition.alpha > 0, "a float > 0"),
        ("data.test_size", 0 < cfg.data.test_size < 1, "in (0, 1)"),
        ("num_threads", cfg.num_threads is None or cfg.num_threads >= 1, "null or an int >= 1"),
        ("data.val_fraction", 0 <= cfg.data.val_fraction < 1, "in [0, 1)"),
        ("data.client_val_fraction", 0 <= cfg.data.client_val_fraction < 1, "in [0, 1)"),
        ("data.top_labels", cfg.data.top_labels == 0 or cfg.data.top_labels >= 2, "0 (all) or an int >= 2"),
    ]
    for key, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{key}: expected {rule}, but got {OmegaConf.select(cfg, key)!r}.")
    if cfg.federation.min_clients > cfg.partition.num_clients:
        raise ConfigError(
            f"federation.min_clients: expected at most partition.num_clients ({cfg.partition.num_clients}),"
            f" but got {cfg.federation.min_clients}."
        )
    fraction = list(cfg.partition.observed_fraction)
    if len(fraction) != 2 or not 0 < fraction[0] <= fraction[1] <= 1:
        raise ConfigError(
            f"partition.observed_fraction: expected [low, high] with 0 < low <= high <= 1, but got {fraction}."
        )
    if not cfg.methods:
        raise ConfigError("methods: expected at least one method, but got none.")
    import lightning.pytorch as pl  # here, not at the top: loading a configuration stays light

    check_arguments(pl.Trainer, OmegaConf.to_container(cfg.trainer, resolve=True), "trainer")  # type: ignore[arg-type]
    # a second copy: the check above rewrites the specs it parses in place
    for key, spec in _callback_specs(OmegaConf.to_container(cfg.trainer, resolve=True)):
        _resolve(spec, pl.Callback, key)  # checked, not built: a bad one fails here, before any training


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The client Trainer overrides of ``cfg.trainer``, with its ``callbacks`` specs (one or a list of
    ``{class_path, init_args}``, or class path strings) built into :class:`~lightning.pytorch.Callback` instances.

    The same instances serve every client of a run (each client's Trainer gets them in turn), so a callback that
    keeps state across fits (EarlyStopping, ModelCheckpoint) carries it from one client to the next.

    Raises:
        ConfigError: naming ``trainer.callbacks`` (``trainer.callbacks[i]`` in a list) for a spec that does not
            build a callback.
    """
    import lightning.pytorch as pl

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if not isinstance(kwargs, dict):
        return {}
    if kwargs.get("callbacks") is not None:
        kwargs["callbacks"] = [instantiate(spec, pl.Callback, key) for key, spec in _callback_specs(kwargs)]
    return {str(k): v for k, v in kwargs.items()}


def _callback_specs(trainer: Any) -> list[tuple[str, Any]]:
    """``(key, spec)`` of each entry of the ``trainer`` section's ``callbacks``: ``trainer.callbacks`` for a single
    spec, ``trainer.callbacks[i]`` in a list."""
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    if callbacks is None:
        return []
    if not isinstance(callbacks, list):
        return [("trainer.callbacks", callbacks)]
    return [(f"trainer.callbacks[{i}]", spec) for i, spec in enumerate(callbacks)]


def instantiate(spec: Any, base: type, key: str, **injected: Any) -> Any:
    """Build ``{class_path, init_args}`` (or a bare class path string) into an instance of ``base``.

    ``injected`` arguments (e.g. ``num_labels`` from the data) are added when the class accepts them and the
    configuration does not set them. Unknown arguments and values of the wrong type are rejected before the
    constructor runs; the constructor's own checks are reported under ``key``.

    Raises:
        ConfigError: naming ``key`` (and the argument) with the rule and the value.
    """
    cls, init_args, accepted = _resolve(spec, base, key)
    for name, value in injected.items():
        if name in accepted and name not in init_args:
            init_args[name] = value
    try:
        return cls(**init_args)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key}.init_args: {_one_line(err)}") from None


def _resolve(spec: Any, base: type, key: str) -> tuple[Any, dict[str, Any], set[str]]:
    """The class, the checked ``init_args`` and the accepted argument names of a ``{class_path, init_args}`` spec
    (nothing is built)."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(
            f"{key}: expected a class path or a mapping with `class_path` and `init_args`, but got {spec!r}."
        )
    unknown = sorted(set(spec) - {"class_path", "init_args"})
    if unknown:
        raise ConfigError(f"{key}: unknown keys {unknown}; expected `class_path` and `init_args`.")
    cls = import_class(spec["class_path"], f"{key}.class_path")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}.class_path: expected a subclass of {base.__name__}, but got {spec['class_path']!r}.")
    init_args = dict(spec.get("init_args") or {})
    accepted = check_arguments(cls, init_args, f"{key}.init_args")
    return cls, init_args, accepted


def check_arguments(cls: Any, arguments: typing.Mapping[str, Any], key: str) -> set[str]:
    """Reject arguments that ``cls.__init__`` does not take or whose values do not fit its type hints (checked by
    jsonargparse, the parser behind LightningCLI, so a YAML that passes here passes there).

    Returns:
        The names ``cls.__init__`` accepts.

    Raises:
        ConfigError: naming ``key.<argument>``.
    """
    params = inspect.signature(cls.__init__).parameters
    accepted = {
        name for name, p in params.items() if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    for name in arguments:
        if name not in accepted:
            raise ConfigError(f"{key}.{name}: not an argument of {cls.__name__}; expected one of {sorted(accepted)}.")
    hints = _type_hints(cls.__init__)
    for name, value in arguments.items():
        if not _fits(cls, name, value, params):
            raise ConfigError(
                f"{key}.{name}: expected {_type_name(hints.get(name, Any))}, but got {value!r}"
                f" ({type(value).__name__})."
            )
    return accepted


def import_class(path: str, key: str) -> Any:
    """Import ``package.module.Name``."""
    module_name, _, name = str(path).rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}: expected a dotted path such as 'package.module.Class', but got {path!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({_one_line(err)}).") from None
    if not hasattr(module, name):
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {name!r}.")
    return getattr(module, name)


def _type_hints(func: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func)
    except Exception:  # unresolvable annotations: the message names the type as Any
        return {}


def _fits(cls: Any, name: str, value: Any, params: typing.Mapping[str, inspect.Parameter]) -> bool:
    """Whether ``value`` fits the type of ``cls``'s argument ``name``, as LightningCLI's parser (jsonargparse) sees
    it."""
    from jsonargparse import ArgumentError, ArgumentParser  # here: loading a configuration stays light

    parser = ArgumentParser(exit_on_error=False)
    others = {other for other in params if other not in ("self", name)}
    parser.add_class_arguments(cls, skip=others, fail_untyped=False, sub_configs=False)
    try:
        parser.parse_object({name: value})
    except ArgumentError:
        return False
    return True


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    message = str(err).split("\n")[0].strip()
    return message or type(err).__name__


def to_yaml(cfg: DictConfig) -> str:
    """The resolved configuration as YAML."""
    return OmegaConf.to_yaml(cfg, resolve=True)
