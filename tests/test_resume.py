"""Resume that cannot be fooled: fingerprints of the whole run, and damaged checkpoints named with a HINT."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_fedharmony import FedAvg, FedHarmony
from lightning_fedharmony.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    save_checkpoint,
)
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.orchestrator import Federation


def _clients(num: int = 2, n: int = 96) -> list[ClientDataModule]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=generator)
    y = (x @ torch.randn(6, 4, generator=generator) > 0.3).float()
    return [ClientDataModule(x[i::num], y[i::num], batch_size=32) for i in range(num)]


def _model(hidden: int = 8) -> MultilabelMLP:
    torch.manual_seed(0)
    return MultilabelMLP(6, 4, hidden=(hidden,))


def _federation(tmp_path: Path, **kwargs) -> Federation:
    args = {"model": _model(), "clients": _clients(), "aggregator": FedHarmony(), "num_rounds": 1}
    args.update(kwargs)
    return Federation(**args, checkpoint_dir=tmp_path, verbose=False)


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    """A checkpoint dir holding a finished one-round FedHarmony run with a `partition` fingerprint entry."""
    _federation(tmp_path, fingerprint_extra={"partition": {"alpha": 0.1, "num_clients": 2}}).fit()
    return tmp_path


def test_same_setup_resumes_with_the_same_numbers(finished: Path) -> None:
    first = load_checkpoint(finished / CHECKPOINT_NAME)["history"]["rounds"]
    again = _federation(finished, fingerprint_extra={"partition": {"alpha": 0.1, "num_clients": 2}})
    result = again.fit()
    assert [r.metrics for r in result.rounds] == [r["metrics"] for r in first]


def test_changed_aggregator_argument_is_refused(finished: Path) -> None:
    other = _federation(
        finished,
        aggregator=FedHarmony(alignment_weight=0.5),
        fingerprint_extra={"partition": {"alpha": 0.1, "num_clients": 2}},
    )
    with pytest.raises(
        CheckpointMismatchError, match=r"federation\.ckpt: .*`aggregator_args\.alignment_weight` differs: saved 0\.03"
    ):
        other.fit()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"fingerprint_extra": {"partition": {"alpha": 0.5, "num_clients": 2}}}, "partition.alpha"),
        ({"fingerprint_extra": None}, "partition.alpha"),
        ({"model": _model(hidden=16)}, "model_hparams.hidden"),
        ({"clients": _clients(n=80)}, "client_samples.0"),
        ({"eval_every": 2}, "eval_every"),
        ({"stats_noise_multiplier": 0.5}, "stats_noise_multiplier"),
    ],
)
def test_any_result_relevant_change_is_refused_naming_the_key(finished: Path, change: dict, key: str) -> None:
    other = _federation(finished, **{"fingerprint_extra": {"partition": {"alpha": 0.1, "num_clients": 2}}, **change})
    with pytest.raises(CheckpointMismatchError, match=rf"`{key}` differs: saved .*, now .*HINT: use another"):
        other.fit()


def test_checkpoint_of_an_earlier_version_is_refused_with_a_hint(finished: Path) -> None:
    path = finished / CHECKPOINT_NAME
    state = load_checkpoint(path)
    state["fingerprint"] = {k: state["fingerprint"][k] for k in ("clients", "aggregator", "num_rounds", "seed")}
    save_checkpoint(path, {k: v for k, v in state.items() if k != "version"})
    other = _federation(finished, fingerprint_extra={"partition": {"alpha": 0.1, "num_clients": 2}})
    with pytest.raises(CheckpointMismatchError, match=r"earlier version .* HINT: use a fresh `checkpoint_dir`"):
        other.fit()


@pytest.mark.parametrize(
    ("aggregator", "refused"),
    [
        (FedAvg(), None),
        (FedHarmony(quality_aggregation=True, proximal_scaling="none"), None),
        (FedHarmony(), "aggregator_args.proximal_scaling"),  # the drift rule trains differently
    ],
)
def test_checkpoint_from_before_proximal_scaling_resumes_where_nothing_changed(
    tmp_path: Path, aggregator, refused: str | None
) -> None:
    """A checkpoint written before ``proximal_scaling`` existed (neither the model nor the aggregator recorded it)
    trained as ``"none"`` does."""
    _federation(tmp_path, aggregator=aggregator).fit()
    path = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    del state["fingerprint"]["model_hparams"]["proximal_scaling"]
    state["fingerprint"]["aggregator_args"].pop("proximal_scaling", None)
    save_checkpoint(path, state)
    again = _federation(tmp_path, aggregator=aggregator)
    if refused is None:  # resumed: the finished run's record, timings included, not a new round
        assert [r.seconds for r in again.fit().rounds] == [r["seconds"] for r in state["history"]["rounds"]]
    else:
        with pytest.raises(CheckpointMismatchError, match=rf"`{refused}` differs: saved 'none', now 'drift'"):
            again.fit()


def test_checkpoint_from_before_eval_every_was_recorded_counts_it_as_1(finished: Path) -> None:
    """Flower's fingerprint records ``eval_every`` since ``FedHarmonyStrategy(eval_every=...)``; earlier ones ran with
    1 (the defaults are runner-agnostic, so a ``Federation`` checkpoint stands in for a Flower one)."""
    path = finished / CHECKPOINT_NAME
    state = load_checkpoint(path)
    del state["fingerprint"]["eval_every"]
    save_checkpoint(path, state)
    extra = {"partition": {"alpha": 0.1, "num_clients": 2}}
    with pytest.raises(CheckpointMismatchError, match=r"`eval_every` differs: saved 1, now 2"):
        _federation(finished, fingerprint_extra=extra, eval_every=2).fit()
    resumed = _federation(finished, fingerprint_extra=extra).fit()
    assert [r.seconds for r in resumed.rounds] == [r["seconds"] for r in state["history"]["rounds"]]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a checkpoint\xff" * 64)


def _pickled_object(path: Path) -> None:
    torch.save({"version": 1, "history": object()}, path)


def _missing_keys(path: Path) -> None:
    save_checkpoint(path, {"server_round": 1})


def _other_version(path: Path) -> None:
    torch.save({"version": 99}, path)


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (_truncate, "damaged or truncated"),
        (_garbage, "expected a readable federation checkpoint, but it"),
        (_pickled_object, "not a torch file of tensors and plain values"),
        (_missing_keys, r"\['global_weights', 'aggregator', 'history', 'fingerprint'\] are missing"),
        (_other_version, "of version 1, but got 99"),
    ],
)
def test_damaged_checkpoint_is_one_library_error_naming_the_file(finished: Path, damage, what: str) -> None:
    path = finished / CHECKPOINT_NAME
    damage(path)
    other = _federation(finished, fingerprint_extra={"partition": {"alpha": 0.1, "num_clients": 2}})
    pattern = rf"^{re.escape(str(path))}: .*{what}.* HINT: delete it to start over"
    with pytest.raises(CheckpointError, match=pattern) as err:
        other.fit()
    assert "\n" not in str(err.value)
    assert isinstance(err.value, RuntimeError)


def test_checkpoint_content_that_does_not_fit_is_a_checkpoint_error(finished: Path) -> None:
    path = finished / CHECKPOINT_NAME
    state = load_checkpoint(path)
    state["history"] = {"rounds": "not a list"}
    save_checkpoint(path, {k: v for k, v in state.items() if k != "version"})
    other = _federation(finished, fingerprint_extra={"partition": {"alpha": 0.1, "num_clients": 2}})
    with pytest.raises(CheckpointError, match=r"content to fit this federation, but restoring it failed .*HINT"):
        other.fit()


def test_fingerprint_extra_is_checked() -> None:
    with pytest.raises(TypeError, match=r"`fingerprint_extra` to hold plain values .* `fingerprint_extra.x` is Tensor"):
        Federation(_model(), _clients(), FedAvg(), fingerprint_extra={"x": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"leave the federation's own entries .* but got \['seed'\]"):
        Federation(_model(), _clients(), FedAvg(), fingerprint_extra={"seed": 1})
    with pytest.raises(TypeError, match="to be None or a mapping, but got list"):
        Federation(_model(), _clients(), FedAvg(), fingerprint_extra=[1])  # type: ignore[arg-type]


@pytest.mark.parametrize("aggregator", [FedAvg(), FedHarmony()], ids=["fedavg", "fedharmony"])
def test_checkpoint_from_before_server_momentum_resumes_without_it(tmp_path: Path, aggregator) -> None:
    """A checkpoint written before ``server_momentum`` existed ran without it: it resumes a run that keeps it off and
    is refused, naming the setting, by one that turns it on."""
    _federation(tmp_path, aggregator=aggregator).fit()
    path = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    for key in ("server_momentum", "server_momentum_adaptive"):
        del state["fingerprint"]["aggregator_args"][key]
    save_checkpoint(path, state)
    resumed = _federation(tmp_path, aggregator=type(aggregator)()).fit()
    assert [r.seconds for r in resumed.rounds] == [r["seconds"] for r in state["history"]["rounds"]]
    with pytest.raises(CheckpointMismatchError, match=r"`aggregator_args.server_momentum` differs: saved 0.0, now 0.5"):
        _federation(tmp_path, aggregator=type(aggregator)(server_momentum=0.5)).fit()


@pytest.mark.parametrize(
    ("aggregator", "refused"),
    [
        (FedAvg(), False),
        (FedHarmony(proximal_rows="uniform", proximal_reference_labels=0.0), False),
        (FedHarmony(proximal_reference_labels=0.0), True),
    ],
    ids=["fedavg", "fedharmony-uniform", "fedharmony-labels"],
)
def test_checkpoint_from_before_label_rows_counts_as_uniform(tmp_path: Path, aggregator, refused: bool) -> None:
    """A checkpoint written before ``proximal_rows`` and ``proximal_reference_labels`` existed trained with FedProx's
    uniform term and one ``mu``: it resumes a run that keeps them and is refused, naming a setting, by the defaults
    since."""
    _federation(tmp_path, aggregator=aggregator).fit()
    path = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    for section in ("model_hparams", "aggregator_args"):
        for key in ("proximal_rows", "proximal_full_at", "proximal_absent", "proximal_reference_labels"):
            state["fingerprint"].get(section, {}).pop(key, None)
    save_checkpoint(path, state)
    again = _federation(tmp_path, aggregator=aggregator)
    if not refused:
        assert [r.seconds for r in again.fit().rounds] == [r["seconds"] for r in state["history"]["rounds"]]
    else:
        with pytest.raises(CheckpointMismatchError, match=r"`aggregator_args.proximal_rows` differs: saved 'uniform'"):
            again.fit()


def test_checkpoint_from_before_the_label_count_factor_counts_as_off(tmp_path: Path) -> None:
    """A checkpoint written before ``proximal_reference_labels`` existed trained with one ``mu`` for every label count:
    it resumes a run that keeps the factor off and is refused, naming the setting, by the default."""
    _federation(tmp_path, aggregator=FedHarmony(proximal_reference_labels=0.0)).fit()
    path = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    for section in ("model_hparams", "aggregator_args"):
        state["fingerprint"].get(section, {}).pop("proximal_reference_labels", None)
    save_checkpoint(path, state)
    with pytest.raises(
        CheckpointMismatchError, match=r"`aggregator_args.proximal_reference_labels` differs: saved 0.0, now 22.0"
    ):
        _federation(tmp_path, aggregator=FedHarmony()).fit()
    again = _federation(tmp_path, aggregator=FedHarmony(proximal_reference_labels=0.0)).fit()
    assert [r.seconds for r in again.rounds] == [r["seconds"] for r in state["history"]["rounds"]]
