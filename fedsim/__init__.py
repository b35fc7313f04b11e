"""fedsim: simulate and run federated learning on Flower.

The package holds the method maths (``fedsim.sparse``, ``fedsim.conformal``, ``fedsim.pac``,
``fedsim.dora``), the Flower adapters (``fedsim.strategies``, ``fedsim.clients``) and the runner,
config and command line (``python -m fedsim``).
"""

__version__ = "0.1.0"
