"""A user's own LightningCLI script: one FedHarmony client, everything configured in YAML.

Run from the repository root (`federate.sh` starts three of these with `fedharmony serve`):
    python examples/lightning_cli/train.py fit --config examples/lightning_cli/client.yaml
"""

from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    # no fixed classes: the YAML picks the model, the datamodule and the callbacks by `class_path`;
    # the saved copy of the config is overwritten by each run of the same client
    LightningCLI(save_config_kwargs={"overwrite": True})
