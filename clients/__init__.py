"""Flower ``ClientApp`` logic for fedsim's strategies, one module per method.

Each module exposes ``app``, a ``flwr.clientapp.ClientApp`` whose handlers read the run's data
and model settings from the ``fedsim`` config record of each message (or from the run config
under Flower's deployment engine), so the same app runs under fedsim's engines and ``flwr run``.
"""
