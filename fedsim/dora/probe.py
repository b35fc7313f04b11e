"""An allocation probe for PyTorch code: which tensors an operation creates, and the peak of them.

``torch.cuda.max_memory_allocated`` has no CPU counterpart, and ``tracemalloc`` does not see
PyTorch's allocator, so DoRA's tests and benchmarks observe allocations at the dispatcher instead.
:class:`AllocationProbe` is a ``TorchDispatchMode`` that intercepts every ATen operation, including those
that autograd runs in backward. It records outputs that do not alias an input (new storages) and
keeps a weak reference to each, so it can count the bytes of new storages that are alive at once.

Limits: it counts tensor storages only, not scratch memory that a kernel allocates and frees inside
one operation (for example a BLAS workspace), nor memory that Python objects hold. A storage freed
between two operations is noticed at the next operation, which is when the peak can next change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Allocation", "AllocationProbe"]


@dataclass(frozen=True)
class Allocation:
    """A tensor created by one ATen operation with storage not shared with the operation's inputs."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class AllocationProbe(TorchDispatchMode):
    """Record new tensor allocations and the peak bytes of those alive at once.

    Attributes:
        allocations: every new output, in order.
        peak_bytes: the maximum, over the probe's lifetime, of the bytes of storages created inside
            it and still alive. Storages that existed before the probe started are not counted.
        live_bytes: the bytes of such storages alive now.
    """

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[Allocation] = []
        self.peak_bytes = 0
        self.live_bytes = 0
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def _release_expired(self) -> None:
        expired = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in expired:
            self.live_bytes -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)

        inputs, _ = tree_flatten((args, kwargs))
        input_storages = {
            item.untyped_storage().data_ptr() for item in inputs if isinstance(item, torch.Tensor)
        }
        self._release_expired()

        outputs, _ = tree_flatten(output)
        for item in outputs:
            if not isinstance(item, torch.Tensor):
                continue
            storage = item.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in input_storages or key in self._live:
                continue
            nbytes = storage.nbytes()
            self.allocations.append(Allocation(str(func), tuple(item.shape), item.dtype, nbytes))
            self._live[key] = (StorageWeakRef(storage), nbytes)
            self.live_bytes += nbytes

        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return output

    def shapes(self) -> set[tuple[int, ...]]:
        """Return the set of shapes of all recorded allocations."""
        return {allocation.shape for allocation in self.allocations}
