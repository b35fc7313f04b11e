"""Flower server strategies (``flwr.serverapp.strategy.Strategy``) for fedsim's methods.

Every strategy takes plain values in its constructor, so it can be used in any Flower app.
"""

from fedsim.strategies.collab_pac import CollaborativePAC
from fedsim.strategies.dora_fedavg import DoRAFedAvg
from fedsim.strategies.fedavg import FedAvg
from fedsim.strategies.gcfcp import GCFCP
from fedsim.strategies.local_only import LocalOnly
from fedsim.strategies.spafl import SpaFL

__all__ = ["GCFCP", "CollaborativePAC", "DoRAFedAvg", "FedAvg", "LocalOnly", "SpaFL"]
