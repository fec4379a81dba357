"""Peak memory of a piece of work, on GPU and on CPU.

    with PeakMemory(device) as mem:
        res = robust_criticality(model, "layer2.0.conv2", x_adv, y)
    mem.peak_bytes, mem.method

GPU (``cuda``): ``torch.cuda.max_memory_allocated`` above the memory allocated at entry
(the caching allocator's peak of live tensor bytes; ``reset_peak_memory_stats`` at entry).

CPU: the peak, over the block, of the total size of the tensor storages allocated inside
it and alive at the same time (method ``cpu_tensor_bytes``). A ``TorchDispatchMode`` sees
every ATen op (forward and backward); each new output storage is counted when it appears
and uncounted when it is freed. Storages that an op's output shares with one of its inputs
(views, in-place ops) are not new. Tensors that existed before the block are not counted,
nor are library scratch buffers that never become tensors (oneDNN workspaces) or Python
objects. Unlike the process RSS, which the allocator and thread pools dominate, this
resolves what the method allocates, and it is deterministic for a given computation.
The mode costs a few microseconds of Python per op.
"""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _TensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self.live:
                continue
            if inputs is None:
                inputs = {
                    a.untyped_storage().data_ptr()
                    for a in tree_leaves((args, kwargs))
                    if isinstance(a, torch.Tensor) and not a.is_meta
                }
            if key in inputs:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._free, key)
        return out


class PeakMemory:
    """Context manager: ``peak_bytes`` allocated inside the block (see the module docstring).

    ``method``: ``cuda_max_memory_allocated`` or ``cpu_tensor_bytes``.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = (
            "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_tensor_bytes"
        )
        self._mode: _TensorBytes | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _TensorBytes()
            self._mode.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._mode is not None:
            self._mode.__exit__(exc_type, exc, tb)
            self.peak_bytes = self._mode.peak
