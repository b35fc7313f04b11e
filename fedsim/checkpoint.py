"""Checkpoints of a run, and what resuming needs from them.

A checkpoint after round ``r`` is ``checkpoints/round-000r/`` holding

- ``arrays.safetensors``: the global arrays the strategy continues from;
- ``clients/``: a snapshot of the per-client state files (hard links where the file system
  allows, because client state files are only ever replaced, never changed in place);
- ``state.json``: the round, the strategy's own state, the config hash and the fedsim version,
  written last, so a folder without it is an unfinished checkpoint and is ignored.

Random streams need no saved state: every stream is derived from the root seed, its purpose and
the round, so a resumed run draws exactly what the uninterrupted run drew. Nothing is pickled,
so loading a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from safetensors.numpy import load_file, save_file

from fedsim.records import array_record_from_numpy, to_numpy_dict
from fedsim.results import write_atomic

__all__ = ["Checkpoint", "CheckpointError", "config_hash", "latest_checkpoint", "restore_client_state", "write_checkpoint"]

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume this run; the message names the difference."""


@dataclass(frozen=True)
class Checkpoint:
    """A finished checkpoint: its folder, round, global arrays and saved state."""

    path: Path
    round: int
    arrays: ArrayRecord
    state: dict[str, Any]


def config_hash(config_yaml: str) -> str:
    """Return the SHA-256 of a resolved config's YAML text."""
    return hashlib.sha256(config_yaml.encode("utf-8")).hexdigest()


def _snapshot_clients(source: Path, target: Path) -> int:
    if not source.is_dir():
        return 0
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in source.glob("*.safetensors"):
        try:
            os.link(path, target / path.name)
        except OSError:
            shutil.copy2(path, target / path.name)
        count += 1
    return count


def write_checkpoint(
    run_dir: Path,
    server_round: int,
    arrays: ArrayRecord,
    strategy_state: dict[str, Any],
    config_yaml: str,
    version: str,
) -> Path:
    """Write the checkpoint of ``server_round`` under ``run_dir/checkpoints`` and return its folder."""
    folder = run_dir / "checkpoints" / f"round-{server_round:04d}"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    tensors = {key: np.ascontiguousarray(values) for key, values in to_numpy_dict(arrays).items()}
    save_file(tensors, str(partial / ARRAYS_FILE), metadata={"order": json.dumps(list(tensors))})
    clients = _snapshot_clients(run_dir / "clients", partial / "clients")
    state = {
        "round": server_round,
        "strategy": strategy_state,
        "config_sha256": config_hash(config_yaml),
        "fedsim_version": version,
        "client_files": clients,
        "random_streams": "derived from run.seed, purpose and round; nothing to restore",
    }
    write_atomic(partial / STATE_FILE, json.dumps(state, indent=2) + "\n")

    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    logger.info("checkpoint of round %d written to %s", server_round, folder)
    return folder


def _read(folder: Path) -> Checkpoint:
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    from safetensors import safe_open

    with safe_open(str(folder / ARRAYS_FILE), framework="numpy") as handle:
        order = json.loads((handle.metadata() or {}).get("order", "[]"))
    tensors = load_file(str(folder / ARRAYS_FILE))
    ordered = {key: tensors[key] for key in order if key in tensors} | {k: v for k, v in tensors.items() if k not in order}
    return Checkpoint(folder, int(state["round"]), array_record_from_numpy(ordered), state)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """Return the newest finished checkpoint of ``run_dir``, or None when there is none."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    finished = sorted(p for p in root.glob("round-*") if p.is_dir() and not p.name.endswith(".partial") and (p / STATE_FILE).is_file())
    return _read(finished[-1]) if finished else None


def restore_client_state(run_dir: Path, checkpoint: Checkpoint | None) -> None:
    """Replace ``run_dir/clients`` with the checkpoint's snapshot (or remove it without one)."""
    clients = run_dir / "clients"
    shutil.rmtree(clients, ignore_errors=True)
    if checkpoint is not None and (checkpoint.path / "clients").is_dir():
        _snapshot_clients(checkpoint.path / "clients", clients)


def check_compatible(checkpoint: Checkpoint, config_yaml: str, version: str, stored_yaml: str | None) -> None:
    """Raise :class:`CheckpointError` when ``checkpoint`` was written by another config or version."""
    if checkpoint.state.get("fedsim_version") != version:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written by fedsim {checkpoint.state.get('fedsim_version')}, "
            f"this is fedsim {version}; resume it with that version or start a new run"
        )
    if checkpoint.state.get("config_sha256") != config_hash(config_yaml):
        difference = describe_difference(stored_yaml, config_yaml) if stored_yaml else "the config hash differs"
        raise CheckpointError(f"the run folder was written with a different config ({difference}); start a new run instead")


def describe_difference(old_yaml: str, new_yaml: str) -> str:
    """Name the first keys whose values differ between two resolved config YAML texts."""
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(OmegaConf.create(old_yaml))
    new = OmegaConf.to_container(OmegaConf.create(new_yaml))
    changes: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        elif a != b:
            changes.append(f"{path}: {a!r} in the run folder, {b!r} now")

    walk(old, new, "")
    return "; ".join(changes[:5]) if changes else "no key differs, but the text does"
