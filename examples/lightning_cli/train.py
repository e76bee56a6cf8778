"""A user's own LightningCLI script: one FedHarmony client, everything configured in YAML.

Run from the repository root:
    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml
"""

from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    # no fixed classes: the YAML picks the model, the datamodule and the callbacks by `class_path`;
    # a client runs once per round, so the saved copy of its config is overwritten each time
    LightningCLI(save_config_kwargs={"overwrite": True})
