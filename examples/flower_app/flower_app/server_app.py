"""The ServerApp: FedHarmonyStrategy around the library's aggregator, evaluation of the global model on the server,
checkpoints to resume from, retries and a time limit for the clients."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flower_app import task
from lightning_fedharmony.integrations.flower import FedHarmonyStrategy, make_evaluate_fn, weights_to_arrays
from lightning_fedharmony.mixin import model_weights

app = ServerApp()

#: run config entries left out of the checkpoint's fingerprint: they change no trained number, so a resumed run may
#: change them (all but eval-every, which the strategy's own fingerprint holds as `eval_every`)
RUN_ONLY = ("result-path", "checkpoint-dir", "round-retries", "client-timeout", "eval-every")


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    data = task.load_data(config, num_partitions=int(config["min-available-clients"]))
    model = task.model(config, data.train.num_features, data.train.num_labels)
    strategy = FedHarmonyStrategy(
        task.aggregator(config),
        fraction_fit=float(config["fraction-fit"]),
        min_clients=int(config["min-clients"]),
        min_available_clients=int(config["min-available-clients"]),
        local_epochs=int(config["local-epochs"]),
        seed=int(config["seed"]),
        client_sampling=str(config.get("client-sampling", "uniform")),
        checkpoint_dir=str(config["checkpoint-dir"]) or None,
        round_retries=int(config["round-retries"]),
        client_timeout=float(config["client-timeout"]) or None,
        federated_eval=str(config.get("federated-eval", "exact")),
        eval_every=int(config.get("eval-every", 1)),
        # the data, partition and model settings join the checkpoint's fingerprint: a checkpoint of another setup
        # is refused rather than resumed
        fingerprint_extra={"run_config": {key: value for key, value in config.items() if key not in RUN_ONLY}},
    )
    strategy.start(
        grid,
        weights_to_arrays(model_weights(model)),
        num_rounds=int(config["num-server-rounds"]),
        evaluate_fn=make_evaluate_fn(model, data.test_loader()),
    )
    if config["result-path"]:
        strategy.result.to_json(str(config["result-path"]))
