"""Client of local-only training: its weights persist on disk between rounds, never sent.

All clients start from the same seeded initialisation, as under federated averaging, so the
comparison isolates the effect of communication.
"""

from __future__ import annotations

from fedsim.clients.common import build_client_model, get_client_data, new_client_app, read_spec
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedsim.client_state import load_client_state, save_client_state
from fedsim.models import build_model
from fedsim.seeding import torch_generator
from fedsim.training import evaluate_model, make_optimizer, train_model

__all__ = ["app"]

app = new_client_app()


def _restore(spec: dict, data, model) -> None:
    stored = load_client_state(spec["run_dir"], data.partition_id)
    if stored is not None:
        model.load_state_dict(stored[0])
        return
    # No state yet: start from the shared seeded initialisation.
    model_spec = dict(spec["model"])
    name = model_spec.pop("name")
    options = {"hidden": model_spec["hidden"]} if name == "mlp" else {}
    fresh = build_model(name, data.input_shape, data.num_classes, seed=int(spec["seed"]), **options)
    model.load_state_dict(fresh.state_dict())


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train this client's own model for one round and store it."""
    spec = read_spec(message, context)
    data = get_client_data(spec, context)
    model = build_client_model(spec, data)
    _restore(spec, data, model)

    client = spec["client"]
    server_round = int(message.content.config_records["config"]["server-round"])
    optimizer = make_optimizer(model.parameters(), client["optimizer"], client["lr"], client["momentum"], client["weight_decay"])
    generator = torch_generator(int(spec["seed"]), "client-shuffle", server_round, data.partition_id)
    result = train_model(
        model, data.train_x, data.train_y,
        epochs=int(client["local_epochs"]), batch_size=int(client["batch_size"]),
        optimizer=optimizer, generator=generator, task=data.task,
    )
    save_client_state(spec["run_dir"], data.partition_id, model.state_dict(), {"round": server_round})

    metrics = MetricRecord({"train_loss": result.loss, "num-examples": result.num_examples})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate this client's own model on its test split."""
    spec = read_spec(message, context)
    data = get_client_data(spec, context)
    model = build_client_model(spec, data)
    _restore(spec, data, model)

    result = evaluate_model(model, data.test_x, data.test_y, task=data.task)
    metrics = {"eval_loss": result.loss, "eval_accuracy": result.accuracy, "num-examples": result.num_examples}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
