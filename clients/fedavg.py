"""Client of federated averaging: train the received global model locally, evaluate it.

Local training settings come from the ``client`` section of the run spec; a ``lr`` or
``local-epochs`` entry in the message's ``config`` record overrides them for that round.
"""

from __future__ import annotations

from fedsim.clients.common import (
    build_client_model,
    get_client_data,
    load_arrays,
    new_client_app,
    read_spec,
)
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedsim.records import array_record_from_torch
from fedsim.seeding import torch_generator
from fedsim.training import evaluate_model, make_optimizer, train_model

__all__ = ["app"]

app = new_client_app()


def _round_settings(message: Message, client: dict) -> tuple[int, float, int]:
    config = message.content.config_records.get("config")
    server_round = int(config.get("server-round", 0)) if config is not None else 0
    lr = float(config["lr"]) if config is not None and "lr" in config else float(client["lr"])
    epochs = int(config["local-epochs"]) if config is not None and "local-epochs" in config else int(client["local_epochs"])
    return server_round, lr, epochs


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the global arrays on this client's train split and return the new arrays."""
    spec = read_spec(message, context)
    data = get_client_data(spec, context)
    model = build_client_model(spec, data)
    load_arrays(model, message.content.array_records["arrays"])

    client = spec["client"]
    server_round, lr, epochs = _round_settings(message, client)
    optimizer = make_optimizer(model.parameters(), client["optimizer"], lr, client["momentum"], client["weight_decay"])
    generator = torch_generator(int(spec["seed"]), "client-shuffle", server_round, data.partition_id)
    result = train_model(
        model, data.train_x, data.train_y,
        epochs=epochs, batch_size=int(client["batch_size"]), optimizer=optimizer,
        generator=generator, task=data.task,
    )

    metrics = MetricRecord({"train_loss": result.loss, "num-examples": result.num_examples})
    arrays = array_record_from_torch(model.state_dict())
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the global arrays on this client's test split."""
    spec = read_spec(message, context)
    data = get_client_data(spec, context)
    model = build_client_model(spec, data)
    load_arrays(model, message.content.array_records["arrays"])

    result = evaluate_model(model, data.test_x, data.test_y, task=data.task)
    metrics = {"eval_loss": result.loss, "num-examples": result.num_examples}
    if data.task != "regression":
        metrics["eval_accuracy"] = result.accuracy
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
