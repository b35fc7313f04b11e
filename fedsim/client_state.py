"""Per-client state that outlives a round, stored on disk by partition id.

Personalised methods (local-only training, SpaFL) keep each client's weights between the rounds
it takes part in. Keeping them in the driver's memory would grow with the number of clients, so
they live under ``<run folder>/clients/<partition id>.safetensors``, written atomically
(temporary file, then rename) so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["client_state_path", "load_client_state", "save_client_state"]


def client_state_path(run_dir: str | Path, partition_id: int) -> Path:
    """Return the file of partition ``partition_id``'s state under ``run_dir``."""
    return Path(run_dir) / "clients" / f"{int(partition_id)}.safetensors"


def save_client_state(
    run_dir: str | Path,
    partition_id: int,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, object] | None = None,
) -> Path:
    """Write ``tensors`` (and JSON ``metadata``) for ``partition_id`` atomically; return the path."""
    path = client_state_path(run_dir, partition_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"fedsim": json.dumps(metadata or {}, sort_keys=True)}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(contiguous, temporary, metadata=header)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_client_state(
    run_dir: str | Path, partition_id: int
) -> tuple[dict[str, torch.Tensor], dict[str, object]] | None:
    """Read the state of ``partition_id``, or return None when it has none yet."""
    path = client_state_path(run_dir, partition_id)
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    return load_file(str(path)), json.loads(header.get("fedsim", "{}"))
