"""Framework overhead of fedsim's engines against a plain single-process PyTorch FedAvg loop.

Both sides do the same work: the same partitions, the same sampled clients, the same model,
local epochs, batch size and shuffling, and a sample-weighted average of the client weights.
Federated and centralized evaluation are off, so only training rounds are compared. Round 1 is
excluded on every side (Ray start-up, worker imports, data loading); the remaining rounds are
timed. Overhead per client-round = (fedsim time - plain time) / (rounds x clients per round).

Usage::

    python benchmarks/overhead.py                      # both engines, both models, 10 and 100 clients
    python benchmarks/overhead.py --engines local --profile
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import pstats
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fedsim.strategies.common import sample_node_ids, sample_size

from fedsim.config import load_config
from fedsim.models import build_model
from fedsim.partition import client_data
from fedsim.runner import client_spec, simulate
from fedsim.seeding import torch_generator
from fedsim.training import make_optimizer, train_model


def write_idx_images(root: Path, num_train: int, num_test: int, seed: int = 0) -> None:
    """Write random 28x28 MNIST-format IDX files (images and labels) under ``root``."""
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as stream:
            stream.write(struct.pack(">IIII", 0x803, count, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as stream:
            stream.write(struct.pack(">II", 0x801, count) + labels.tobytes())


def plain_fedavg(config, rounds: int) -> list[float]:
    """Run FedAvg as a plain PyTorch loop; return the wall time of each round in seconds."""
    torch.set_num_threads(max(1, int(config.backend.client_resources.num_cpus)))
    spec = client_spec(config, Path("."))
    seed = config.run.seed
    clients = [client_data(spec["data"], seed, pid) for pid in range(config.data.num_clients)]
    first = clients[0]
    options = {"hidden": list(config.model.hidden)} if config.model.name == "mlp" else {}
    global_model = build_model(config.model.name, first.input_shape, first.num_classes, seed=seed, **options)
    worker = build_model(config.model.name, first.input_shape, first.num_classes, seed=seed, **options)
    global_state = {k: v.clone() for k, v in global_model.state_dict().items()}
    node_order = list(range(config.data.num_clients))
    count = sample_size(len(node_order), config.strategy.fraction_train, config.strategy.min_train_nodes)
    client_settings = config.client

    times = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        sampled = sample_node_ids(node_order, count, seed, "sample-train", server_round)
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        total = 0
        for pid in sampled:
            data = clients[pid]
            worker.load_state_dict(global_state)
            optimizer = make_optimizer(worker.parameters(), client_settings.optimizer, client_settings.lr, client_settings.momentum, client_settings.weight_decay)
            result = train_model(
                worker, data.train_x, data.train_y, epochs=client_settings.local_epochs,
                batch_size=client_settings.batch_size, optimizer=optimizer,
                generator=torch_generator(seed, "client-shuffle", server_round, pid),
            )
            for key, value in worker.state_dict().items():
                sums[key] += value.double() * result.num_examples
            total += result.num_examples
        global_state = {k: (v / total).to(global_state[k].dtype) for k, v in sums.items()}
        times.append(time.perf_counter() - started)
    return times


def fedsim_rounds(config, run_dir: Path, profile: bool) -> tuple[list[float], str]:
    """Run ``config`` through fedsim; return per-round wall times and an optional profile."""
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    outcome = simulate(config, run_dir=run_dir)
    if profiler is not None:
        profiler.disable()
    if outcome.status != "completed":
        raise RuntimeError(f"fedsim run failed: {outcome.error}")
    report = ""
    if profiler is not None:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats("flwr|fedsim|clients|strategies", 12)
        report = stream.getvalue()
    return [float(row["round_s"]) for row in outcome.rows], report


def configure(model: str, engine: str, clients_per_round: int, rounds: int, data_root: Path, out: Path):
    """Build the benchmark config for one case."""
    dataset = ["data.dataset=digits"] if model == "logreg" else ["data.dataset=mnist", f"data.root={data_root}"]
    return load_config(None, [
        *dataset,
        f"model.name={model}",
        "data.num_clients=100",
        "data.partitioner.name=iid",
        f"strategy.fraction_train={clients_per_round / 100}",
        "strategy.fraction_evaluate=0.0",
        "strategy.centralized_evaluation=false",
        "client.local_epochs=1",
        "client.batch_size=32",
        "client.lr=0.05",
        f"run.rounds={rounds}",
        "run.progress=false",
        f"run.output_dir={out}",
        f"backend.name={engine}",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    parser.add_argument("--models", nargs="+", default=["logreg", "lenet5"], choices=["logreg", "lenet5"])
    parser.add_argument("--clients-per-round", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run; round 1 is not timed")
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile of each local run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging

    import flwr.supercore  # noqa: F401  (Flower configures its logger on import)

    logging.getLogger("flwr").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        write_idx_images(scratch_path, num_train=5000, num_test=1000)
        print(f"{'model':<8} {'engine':<6} {'clients/round':>13} {'plain s/round':>14} {'fedsim s/round':>15} {'ratio':>6} {'overhead ms/client-round':>25}")
        profiles = []
        for model in args.models:
            for per_round in args.clients_per_round:
                config = configure(model, "local", per_round, args.rounds, scratch_path, scratch_path / "runs")
                plain = plain_fedavg(config, args.rounds)[1:]
                plain_mean = float(np.mean(plain))
                for engine in args.engines:
                    config = configure(model, engine, per_round, args.rounds, scratch_path, scratch_path / "runs")
                    timed, _ = fedsim_rounds(config, scratch_path / f"{model}-{engine}-{per_round}", profile=False)
                    report = ""
                    if args.profile and engine == "local":
                        # A separate run, so the profiler's own cost never enters the timings.
                        _, report = fedsim_rounds(config, scratch_path / f"{model}-{engine}-{per_round}-profile", profile=True)
                    fedsim_mean = float(np.mean(timed[1:]))
                    overhead_ms = (fedsim_mean - plain_mean) / per_round * 1000
                    print(f"{model:<8} {engine:<6} {per_round:>13} {plain_mean:>14.4f} {fedsim_mean:>15.4f} {fedsim_mean / plain_mean:>6.2f} {overhead_ms:>25.2f}", flush=True)
                    if report:
                        profiles.append((f"{model}, {engine}, {per_round} clients/round", report))
        for title, report in profiles:
            print(f"\nprofile ({title}), top entries by own time:\n{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
