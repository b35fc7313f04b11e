"""Built-in methods: importing this package registers them with the runner and the config."""

from fedsim.methods import (
    collab_pac,  # noqa: F401
    dora,  # noqa: F401
    fedavg,  # noqa: F401
    gcfcp,  # noqa: F401
    spafl,  # noqa: F401
)
from fedsim.methods.base import DataInfo, Method, get_method, methods, register_method

__all__ = ["DataInfo", "Method", "get_method", "methods", "register_method"]
