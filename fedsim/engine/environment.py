"""Process environment for the engines: loopback-only Ray, no telemetry, offline hubs.

The variables must be set before ``ray`` is imported, because Ray reads some of them at import
time, and before any worker process starts, because workers inherit them.
"""

from __future__ import annotations

import os

__all__ = ["ENVIRONMENT", "prepare_environment"]

ENVIRONMENT: dict[str, str] = {
    # Ray binds its servers to every interface unless this is "0".
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    # Opts into Ray's future handling of accelerator variables, which also silences its warning.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def prepare_environment() -> dict[str, str]:
    """Set fedsim's process environment and return the variables set.

    Values the user already exported are kept, so ``RAY_USAGE_STATS_ENABLED=1`` on the command
    line still wins.
    """
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in ENVIRONMENT}
