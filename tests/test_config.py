"""Run configuration: defaults, YAML and dotted overrides, validation, and building ``class_path`` objects."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from omegaconf import OmegaConf

from lightning_fedharmony import FedAvg, FedHarmony, FedProx
from lightning_fedharmony.aggregators import Aggregator
from lightning_fedharmony.config import ConfigError, instantiate, load_config, to_yaml, validate_config
from lightning_fedharmony.models import MultilabelMLP

MLP = "lightning_fedharmony.models.MultilabelMLP"


def test_defaults():
    cfg = load_config()
    assert cfg.seed == 0
    assert cfg.data.name == "river:yeast"
    assert cfg.partition.kind == "dirichlet" and cfg.partition.num_clients == 10 and cfg.partition.alpha == 0.1
    assert cfg.federation.num_rounds >= 1 and cfg.federation.fraction_fit == 1.0 and cfg.federation.min_clients == 1
    assert cfg.model.class_path == MLP
    assert set(cfg.methods) == {"fedavg", "fedprox", "fedharmony", "fedharmony_paper"}
    assert cfg.trainer == {}
    assert cfg.plots is True


def test_yaml_then_dotted_overrides(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "seed: 3\n"
        "federation: {num_rounds: 7, batch_size: 32}\n"
        "partition: {kind: masking, observed_fraction: [0.4, 0.6]}\n"
        "model: {init_args: {hidden: [16, 8]}}\n"
        "methods:\n  mine: {class_path: lightning_fedharmony.FedAvg}\n"
    )
    cfg = load_config(path, ["federation.num_rounds=2", "model.init_args.lr=1e-3", "trainer.max_time=00:00:01:00"])
    assert cfg.seed == 3
    assert cfg.federation.num_rounds == 2  # the command line wins over the file
    assert cfg.federation.batch_size == 32  # the file wins over the default
    assert cfg.federation.local_epochs == 1  # untouched default
    assert cfg.partition.kind == "masking" and list(cfg.partition.observed_fraction) == [0.4, 0.6]
    # mappings merge key by key: the file's hidden, the default class_path, the override's lr as a float
    assert cfg.model.class_path == MLP and list(cfg.model.init_args.hidden) == [16, 8]
    assert cfg.model.init_args.lr == 1e-3 and isinstance(cfg.model.init_args.lr, float)
    assert set(cfg.methods) == {"fedavg", "fedprox", "fedharmony", "fedharmony_paper", "mine"}
    assert cfg.trainer.max_time == "00:00:01:00"
    # the saved YAML loads back to the same configuration
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["federation.num_roundz=3"], r"^federation\.num_roundz: Key 'num_roundz' not in .*Did you mean: 'num_rounds'"),
        (["nope=1"], r"^nope: Key 'nope' not in 'RunConfig'"),
        (["federation.num_rounds=abc"], r"^federation\.num_rounds: Value 'abc' .* could not be converted to Integer"),
        (["seed=1.5"], r"^seed: "),
        (["plots=maybe"], r"^plots: Value 'maybe' is not a valid bool"),
        (["federation=3"], r"^federation: "),
        (["model=[1, 2]"], r"^model: "),
        (["methods=3"], r"^methods: "),
        (["partition.observed_fraction=[a, b]"], r"^partition\.observed_fraction\[0\]: "),
        (["federation.num_rounds=0"], r"^federation\.num_rounds: expected an int >= 1, but got 0\."),
        (["federation.fraction_fit=0"], r"^federation\.fraction_fit: expected in \(0, 1\], but got 0"),
        (
            ["federation.client_sampling=weighted"],
            r"^federation\.client_sampling: expected one of \('uniform', 'size'\), but got 'weighted'\.",
        ),
        (
            ["federation.federated_eval=central"],
            r"^federation\.federated_eval: expected one of \('exact', 'binned', 'none'\), but got 'central'\.",
        ),
        (["federation.eval_bins=1"], r"^federation\.eval_bins: expected an int >= 2, but got 1\."),
        (["federation.min_clients=11"], r"^federation\.min_clients: expected at most partition\.num_clients \(10\)"),
        (["federation.min_clients=4", "partition.num_clients=3"], r"^federation\.min_clients: .*\(3\), but got 4\."),
        (["partition.kind=random"], r"^partition\.kind: expected one of \('dirichlet', .*\), but got 'random'\."),
        (["partition.alpha=0"], r"^partition\.alpha: expected a float > 0"),
        (["partition.observed_fraction=[0.8, 0.5]"], r"^partition\.observed_fraction: expected \[low, high\] with 0 <"),
        (["partition.observed_fraction=[0, 0.5]"], r"^partition\.observed_fraction: .*but got \[0\.0, 0\.5\]\."),
        (["partition.observed_fraction=[0.5]"], r"^partition\.observed_fraction: .*but got \[0\.5\]\."),
        (["data.test_size=1.5"], r"^data\.test_size: expected in \(0, 1\), but got 1\.5\."),
        (["data.top_labels=1"], r"^data\.top_labels: expected 0 \(all\) or an int >= 2, but got 1\."),
        (["trainer.max_epoch=3"], r"^trainer\.max_epoch: not an argument of Trainer; expected one of \[.*'max_epochs'"),
        (["trainer.max_epochs=abc"], r"^trainer\.max_epochs: expected Optional\[int\], but got 'abc' \(str\)\."),
        (["federation.num_rounds"], r"^Expected overrides of the form key=value, but got 'federation\.num_rounds'\."),
    ],
)
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_config_files(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^--config: expected an existing YAML file, but '.*missing\.yaml' does not"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"^--config: expected an existing YAML file"):
        load_config(tmp_path)  # a folder
    broken = tmp_path / "broken.yaml"
    broken.write_text("federation: [\n")
    with pytest.raises(ConfigError, match=r"^--config: '.*broken\.yaml' is not valid YAML \("):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- seed\n- 3\n")
    with pytest.raises(ConfigError, match=r"^--config: expected a mapping of keys in '.*list\.yaml', but got a list"):
        load_config(listed)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("partition:\n  num_client: 3\n")
    with pytest.raises(ConfigError, match=r"^partition\.num_client: Key 'num_client' not in 'PartitionConfig'"):
        load_config(unknown)
    typed = tmp_path / "typed.yaml"
    typed.write_text("federation: 3\n")
    with pytest.raises(ConfigError, match=r"^federation: "):
        load_config(typed)


# ---------------------------------------------------------------------------- instantiate
def test_instantiate_builds_and_injects():
    model = instantiate(
        {"class_path": MLP, "init_args": {"hidden": [4], "lr": 0.01}},
        pl.LightningModule,
        "model",
        num_features=7,
        num_labels=3,
    )
    assert isinstance(model, MultilabelMLP)
    assert model.hparams["num_features"] == 7 and model.hparams["num_labels"] == 3 and model.hparams["lr"] == 0.01
    assert model.net[0].in_features == 7 and model.net[-1].out_features == 3
    # the configuration wins over an injected value; injected names the class does not take are left out
    model = instantiate(
        {"class_path": MLP, "init_args": {"num_labels": 5}},
        pl.LightningModule,
        "model",
        num_features=2,
        num_labels=3,
        not_an_argument=1,
    )
    assert model.hparams["num_labels"] == 5
    # a bare class path, and a DictConfig straight from a loaded configuration
    assert isinstance(instantiate("lightning_fedharmony.FedAvg", Aggregator, "methods.fedavg"), FedAvg)
    cfg = load_config(None, ["methods.fedprox.init_args.proximal_mu=0.5"])
    fedprox = instantiate(cfg.methods.fedprox, Aggregator, "methods.fedprox")
    assert isinstance(fedprox, FedProx) and fedprox.proximal_mu == 0.5
    assert isinstance(instantiate(cfg.methods.fedharmony, Aggregator, "methods.fedharmony"), FedHarmony)


def test_default_methods_are_the_validated_fedharmony_and_the_papers_reading():
    cfg = load_config()
    default = instantiate(cfg.methods.fedharmony, Aggregator, "methods.fedharmony")
    paper = instantiate(cfg.methods.fedharmony_paper, Aggregator, "methods.fedharmony_paper")

    def settings(aggregator: FedHarmony) -> dict:
        return {k: v for k, v in vars(aggregator).items() if not k.startswith("_") and k != "cluster_ids"}

    assert settings(default) == settings(FedHarmony())
    assert settings(paper) == settings(FedHarmony.paper())
    assert settings(default) != settings(paper)


@pytest.mark.parametrize(
    ("spec", "base", "match"),
    [
        (
            {"class_path": MLP, "init_args": {"width": 3}},
            pl.LightningModule,
            r"^model\.init_args\.width: not an argument of MultilabelMLP; expected one of \[.*'hidden'",
        ),
        (
            {"class_path": MLP, "init_args": {"lr": "abc"}},
            pl.LightningModule,
            r"^model\.init_args\.lr: expected float, but got 'abc' \(str\)\.",
        ),
        (
            {"class_path": MLP, "init_args": {"hidden": "abc"}},
            pl.LightningModule,
            r"^model\.init_args\.hidden: expected Sequence\[int\], but got 'abc' \(str\)\.",
        ),
        (
            {"class_path": MLP, "init_args": {"hidden": [1.5]}},
            pl.LightningModule,
            r"^model\.init_args\.hidden: expected Sequence\[int\], but got \[1\.5\]",
        ),
        (
            {"class_path": MLP, "init_args": {"detach_marginals": 1}},
            pl.LightningModule,
            r"^model\.init_args\.detach_marginals: expected bool, but got 1 \(int\)\.",
        ),
        (
            {"class_path": MLP, "init_args": {"corr_normalization": "other"}},
            pl.LightningModule,
            r"^model\.init_args\.corr_normalization: expected Literal\[.*'bernoulli'.*but got 'other'",
        ),
        ({"class_path": "no_such_package.Model"}, pl.LightningModule, r"^model\.class_path: cannot import module"),
        (
            {"class_path": "lightning_fedharmony.models.NoSuchModel"},
            pl.LightningModule,
            r"^model\.class_path: module 'lightning_fedharmony\.models' has no attribute 'NoSuchModel'\.",
        ),
        ({"class_path": "MultilabelMLP"}, pl.LightningModule, r"^model\.class_path: expected a dotted path"),
        (
            {"class_path": "lightning_fedharmony.FedAvg"},
            pl.LightningModule,
            r"^model\.class_path: expected a subclass of LightningModule, but got 'lightning_fedharmony\.FedAvg'\.",
        ),
        (
            {"class_path": MLP, "init_args": {"lr": -1.0}},
            pl.LightningModule,
            r"^model\.init_args: Expected argument `lr` to be positive, but got -1\.0\.",
        ),
        (
            {"class_path": MLP, "args": {}},
            pl.LightningModule,
            r"^model: unknown keys \['args'\]; expected `class_path`",
        ),
        ({"init_args": {}}, pl.LightningModule, r"^model: expected a class path or a mapping with `class_path`"),
        (3, pl.LightningModule, r"^model: expected a class path or a mapping with `class_path` .* but got 3\."),
    ],
)
def test_instantiate_errors_name_the_key(spec, base, match):
    with pytest.raises(ConfigError, match=match):
        instantiate(spec, base, "model", num_features=3, num_labels=2)


def test_instantiate_constructor_error_of_a_method():
    spec = OmegaConf.create({"class_path": "lightning_fedharmony.FedProx", "init_args": {"proximal_mu": -1.0}})
    with pytest.raises(ConfigError, match=r"^methods\.fedprox\.init_args: Expected argument `proximal_mu` to be >= 0"):
        instantiate(spec, Aggregator, "methods.fedprox")


def test_trainer_callbacks_are_built_from_class_path_specs():
    from helpers.models import FitCounter

    from lightning_fedharmony.config import trainer_kwargs

    built = FitCounter.built
    one = load_config(overrides=["trainer.callbacks={class_path: helpers.models.FitCounter, init_args: {label: a}}"])
    validate_config(one)
    assert FitCounter.built == built  # checked, not built
    with pytest.raises(ConfigError, match=r"trainer\.callbacks: expected .*Callback.*, but got .*'label': 3"):
        load_config(overrides=["trainer.callbacks={class_path: helpers.models.FitCounter, init_args: {label: 3}}"])
    (callback,) = trainer_kwargs(one)["callbacks"]
    assert isinstance(callback, FitCounter) and callback.label == "a"
    two = load_config(overrides=["trainer.callbacks=[helpers.models.FitCounter, lightning.pytorch.callbacks.Timer]"])
    built = trainer_kwargs(two)["callbacks"]
    assert [type(c).__name__ for c in built] == ["FitCounter", "Timer"]
    assert trainer_kwargs(two)["callbacks"][0] is not built[0]  # fresh instances per call (per method)
    bad = "trainer.callbacks=[helpers.models.FitCounter, lightning_fedharmony.FedAvg]"
    with pytest.raises(ConfigError, match=r"trainer\.callbacks: expected .*Callback.* but got .*FedAvg"):
        load_config(overrides=[bad])
    unchecked = OmegaConf.create(
        {"trainer": {"callbacks": ["helpers.models.FitCounter", "lightning_fedharmony.FedAvg"]}}
    )
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\[1\]\.class_path: expected a subclass of Callback"):
        trainer_kwargs(unchecked)
