"""Engines that run a ``ServerApp`` with its ``ClientApp``: Flower's Ray simulation or in-process."""

from fedsim.engine.environment import prepare_environment

__all__ = ["prepare_environment"]
