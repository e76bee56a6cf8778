"""CorrelationExchange: state key, statistics of a real fit, teacher import, checkpoints, errors and LightningCLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers.models import (
    NUM_LABELS,
    NoFedHarmonyLossMLP,
    PlainMLP,
    TinyMLP,
    ValidatedMLP,
    make_loader,
    make_trainer,
    multilabel_data,
)

from lightning_fedharmony import (
    CorrelationExchange,
    CorrelationStats,
    DirectoryExchange,
    FederatedClient,
    InMemoryExchange,
)
from lightning_fedharmony.stats import STATS_FIELDS

STATE_KEY = "CorrelationExchange{'client_id': 'a'}"


def _teacher() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    teacher = 2 * torch.rand(NUM_LABELS, NUM_LABELS, generator=generator) - 1
    teacher = (0.5 * (teacher + teacher.T)).fill_diagonal_(1.0)
    mask = ~torch.eye(NUM_LABELS, dtype=torch.bool)
    mask[0, 4] = mask[4, 0] = False
    return teacher, mask


def _frozen_model() -> ValidatedMLP:
    """SGD with lr=0: the predictions stay the same through the whole fit."""
    torch.manual_seed(0)
    return ValidatedMLP(lr=0.0, optimizer="sgd")


def test_state_key() -> None:
    callback = CorrelationExchange(client_id="a")
    assert callback.state_key == STATE_KEY
    assert callback.state_key == callback._generate_state_key(client_id="a")
    assert CorrelationExchange(client_id="b").state_key == "CorrelationExchange{'client_id': 'b'}"
    # built once per client id (Lightning reads it around every hook), and rebuilt when the id changes
    callback.client_id = "c"
    assert callback.state_key == "CorrelationExchange{'client_id': 'c'}"
    assert isinstance(CorrelationExchange().exchange, InMemoryExchange)


def test_exported_stats_equal_one_pass_over_the_data() -> None:
    x, y = multilabel_data(40, seed=1)
    observed = torch.ones(40, NUM_LABELS, dtype=torch.bool)
    observed[::3, 1] = False
    model, exchange = _frozen_model(), InMemoryExchange()
    callback = CorrelationExchange(exchange, client_id="a")
    trainer = make_trainer(max_epochs=2, callbacks=[callback], limit_val_batches=1)
    # a validation loader too: its predictions must not reach the statistics
    trainer.fit(model, make_loader(x, y, observed, batch_size=16), make_loader(x, y, batch_size=16))
    with torch.no_grad():
        preds = torch.sigmoid(model(x))
    expected = CorrelationStats(NUM_LABELS)
    expected.update(preds, y, observed)
    payload = exchange.read_stats("a")
    assert payload is not None and payload.version == 2 and callback.exports == 2
    assert float(payload.stats.num_samples) == 40  # statistics restart every epoch
    for name in STATS_FIELDS:
        torch.testing.assert_close(getattr(payload.stats, name), getattr(expected, name), rtol=1e-6, atol=1e-6)
    assert payload.stats.observed_count[1] == 40 - 14
    torch.testing.assert_close(payload.stats.compute(), expected.compute(), rtol=1e-5, atol=1e-6)
    assert callback.stats is not None and torch.equal(callback.stats.sum_outer, payload.stats.sum_outer)


def test_teacher_published_before_fit_is_installed(tmp_path: Path) -> None:
    x, y = multilabel_data(32, seed=2)
    exchange = DirectoryExchange(tmp_path)
    teacher, mask = _teacher()
    exchange.publish_teacher("a", teacher, mask, version=7)
    torch.manual_seed(0)
    model = TinyMLP()
    assert not model.fedharmony_has_teacher
    callback = CorrelationExchange(exchange, client_id="a")
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback])
    trainer.fit(model, make_loader(x, y))
    assert torch.equal(model.fedharmony_teacher, teacher) and torch.equal(model.fedharmony_mask, mask)
    assert callback.teacher_version == 7
    assert trainer.callback_metrics["train/fedharmony_align_loss"] > 0
    assert len(model.logged["train/fedharmony_align_loss"]) == 2


def test_directory_exchange_from_a_path_string(tmp_path: Path) -> None:
    x, y = multilabel_data(32, seed=3)
    callback = CorrelationExchange(str(tmp_path / "shared"), client_id="site-1")
    assert isinstance(callback.exchange, DirectoryExchange) and callback.exchange.root == tmp_path / "shared"
    assert isinstance(CorrelationExchange(tmp_path, client_id="x").exchange, DirectoryExchange)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback])
    trainer.fit(TinyMLP(), make_loader(x, y))
    assert (tmp_path / "shared" / "stats" / "site-1.npz").is_file()
    payload = DirectoryExchange(tmp_path / "shared").read_stats("site-1")
    assert payload is not None and float(payload.stats.num_samples) == 32 and payload.version == 1


def test_state_dict_round_trip() -> None:
    callback = CorrelationExchange(client_id="a", min_label_rate=0.05)
    assert callback.state_dict() == {"client_id": "a", "teacher_version": -1, "exports": 0, "stats": None}
    stats = CorrelationStats(NUM_LABELS)
    stats.update(torch.rand(6, NUM_LABELS), torch.ones(6, NUM_LABELS))
    callback.stats, callback.teacher_version, callback.exports = stats, 4, 3
    restored = CorrelationExchange(client_id="a", min_label_rate=0.05)
    restored.load_state_dict(callback.state_dict())
    assert restored.teacher_version == 4 and restored.exports == 3
    assert restored.stats is not None and restored.stats.min_label_rate == 0.05
    for name in STATS_FIELDS:
        assert torch.equal(getattr(restored.stats, name), getattr(stats, name))
    # keys missing from older checkpoints fall back to defaults
    restored.load_state_dict({})
    assert (restored.teacher_version, restored.exports, restored.stats) == (-1, 0, None)


def test_checkpoint_and_resume(tmp_path: Path) -> None:
    x, y = multilabel_data(32, seed=4)
    exchange = InMemoryExchange()
    teacher, mask = _teacher()
    exchange.publish_teacher("a", teacher, mask, version=7)
    torch.manual_seed(0)
    callback = CorrelationExchange(exchange, client_id="a")
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(TinyMLP(), make_loader(x, y))
    path = tmp_path / "client-a.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"][STATE_KEY]
    assert state["client_id"] == "a" and state["exports"] == 1 and state["teacher_version"] == 7
    assert callback.stats is not None
    for name in STATS_FIELDS:
        assert torch.equal(state["stats"][name], getattr(callback.stats, name))
    assert torch.equal(checkpoint["state_dict"]["fedharmony_teacher"], teacher)

    # a new process: fresh module, fresh callback, an exchange without any teacher
    resumed_exchange = InMemoryExchange()
    resumed = CorrelationExchange(resumed_exchange, client_id="a")
    model = TinyMLP()
    trainer = make_trainer(max_epochs=2, limit_train_batches=2, callbacks=[resumed], default_root_dir=tmp_path)
    trainer.fit(model, make_loader(x, y), ckpt_path=path)
    assert resumed.teacher_version == 7  # from the checkpoint, not from the (empty) exchange
    assert resumed.exports == 2  # the export counter continued
    assert torch.equal(model.fedharmony_teacher, teacher) and torch.equal(model.fedharmony_mask, mask)
    payload = resumed_exchange.read_stats("a")
    assert payload is not None and payload.version == 2 and float(payload.stats.num_samples) == 32


def test_module_without_mixin_raises() -> None:
    x, y = multilabel_data(16, seed=5)
    trainer = make_trainer(max_epochs=1, limit_train_batches=1, callbacks=[CorrelationExchange()])
    with pytest.raises(TypeError, match=r"PlainMLP does not\. HINT: declare `class MyModel\(FedHarmonyMixin, L"):
        trainer.fit(PlainMLP(), make_loader(x, y))


def test_training_step_without_fedharmony_loss_raises() -> None:
    x, y = multilabel_data(16, seed=5)
    trainer = make_trainer(max_epochs=1, limit_train_batches=1, callbacks=[CorrelationExchange()])
    with pytest.raises(RuntimeError, match=r"no predictions reached the CorrelationExchange.*HINT: compute the loss"):
        trainer.fit(NoFedHarmonyLossMLP(), make_loader(x, y))


def test_constructor_errors() -> None:
    with pytest.raises(TypeError, match="`exchange` to be an Exchange, a folder path or None, but got int"):
        CorrelationExchange(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected argument `client_id` to match"):
        CorrelationExchange(client_id="../a")


def test_lightning_cli_builds_model_and_callback_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli_module = pytest.importorskip("lightning.pytorch.cli")
    monkeypatch.setattr(sys, "argv", ["fedharmony-client"])
    folder = tmp_path / "exchange"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  limit_train_batches: 2
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  logger: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_fedharmony.CorrelationExchange
      init_args:
        exchange: {folder}
        client_id: cli-client
model:
  num_labels: {NUM_LABELS}
  hidden: 8
  alignment_weight: 2.5
  detach_marginals: true
"""
    )
    cli = cli_module.LightningCLI(TinyMLP, run=False, args=["--config", str(config)], save_config_callback=None)
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, CorrelationExchange)]
    assert len(callbacks) == 1 and callbacks[0].client_id == "cli-client"
    assert isinstance(callbacks[0].exchange, DirectoryExchange) and callbacks[0].exchange.root == folder
    assert isinstance(cli.model, TinyMLP) and cli.model.fedharmony_alignment_weight == 2.5
    assert cli.model.fedharmony_detach_marginals
    x, y = multilabel_data(64, seed=6)
    cli.trainer.fit(cli.model, make_loader(x, y, batch_size=16))
    payload = DirectoryExchange(folder).read_stats("cli-client")
    assert payload is not None and payload.version == 1 and float(payload.stats.num_samples) == 32


def test_lightning_cli_builds_the_client_callback_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``trainer.callbacks: [{class_path: lightning_fedharmony.FederatedClient, ...}]`` makes a LightningCLI run a
    client of ``fedharmony serve``: the callback is built with the YAML's arguments (no fit, no server needed)."""
    cli_module = pytest.importorskip("lightning.pytorch.cli")
    monkeypatch.setattr(sys, "argv", ["fedharmony-client"])
    root = tmp_path / "federation"
    config = tmp_path / "client.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_fedharmony.FederatedClient
      init_args:
        root: {root}
        client_id: site-b
        local_epochs: 3
        poll_interval: 0.5
        timeout: null
        reset_optimizer: false
        stats_noise_multiplier: 0.5
        stats_clip: 2.0
model:
  num_labels: {NUM_LABELS}
  hidden: 8
"""
    )
    cli = cli_module.LightningCLI(TinyMLP, run=False, args=["--config", str(config)], save_config_callback=None)
    (client,) = [c for c in cli.trainer.callbacks if isinstance(c, FederatedClient)]
    assert (client.root, client.client_id, client.local_epochs) == (str(root), "site-b", 3)
    assert (client.poll_interval, client.timeout, client.reset_optimizer) == (0.5, None, False)
    assert (client.stats_noise_multiplier, client.stats_clip, client.min_label_rate) == (0.5, 2.0, 1e-3)
    assert client.rounds_done == 0 and not client.stopped

    config.write_text(config.read_text().replace("local_epochs: 3", "local_epochs: 0"))
    with pytest.raises(ValueError, match=r"Expected argument `local_epochs` to be an int >= 1, but got 0"):
        cli_module.LightningCLI(TinyMLP, run=False, args=["--config", str(config)], save_config_callback=None)
