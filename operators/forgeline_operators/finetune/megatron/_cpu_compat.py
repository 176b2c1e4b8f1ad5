"""CPU compatibility layer for megatron-core 0.16.1: lets its CUDA-only code paths run on gloo + CPU.

Applied by :func:`apply` before ``megatron.core`` builds anything, and only when CUDA is absent
(on a GPU node every call below is the real one and :func:`apply` returns without patching).
Patched call sites, and why (measured in ``/work/shared/FACTS.md``):

- ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` and
  ``CudaRNGStatesTracker.add``: the model-parallel RNG tracker (forked around dropout and weight
  init) reads and seeds the CUDA generator; here it forks the CPU generator instead.
- ``torch.cuda.current_device``: used as ``device=`` for buffers (rotary ``inv_freq``, grad buffers,
  attention masks, loss reductions); returns ``"cpu"``.
- ``torch.cuda.synchronize`` / ``torch.cuda.current_stream``: timers and the DDP grad buffers
  synchronise streams; no-ops (a dummy stream with ``wait_stream``/``synchronize``).
- :class:`CpuDeviceMode` (a ``TorchFunctionMode``, entered around training by :func:`cpu_mode`):
  ``device="cuda"`` factory kwargs (the pipeline schedules' token counters, causal masks, grad-clip
  buffers) become ``cpu``, ``Tensor.cuda()`` is the identity, and ``Tensor.type()`` reports
  ``torch.cuda.*`` because ``clip_grads`` and the optimizer assert on that string. This costs about
  25 % on tiny models, so it is only active while megatron code runs.

Keep ``gradient_accumulation_fusion``, ``apply_rope_fusion`` and ``sequence_parallel`` off on CPU
(the model config in :mod:`.model` does). Untested here: nothing of this is used with CUDA present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CpuDeviceMode", "apply", "cpu_mode", "needed"]

_applied = False


def needed() -> bool:
    return not torch.cuda.is_available()


class _NullStream:
    def wait_stream(self, _other: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, *_a: Any, **_k: Any) -> None:
        return None


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class CpuDeviceMode(TorchFunctionMode):
    """Routes CUDA device requests made inside megatron-core to the CPU."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and args[1:] and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_mode() -> Iterator[None]:
    """:class:`CpuDeviceMode` while megatron code runs (a no-op when CUDA is present)."""
    if not needed():
        yield
        return
    with CpuDeviceMode():
        yield


def _cpu_rng_add(self: Any, name: str, seed: int) -> None:
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    original = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(original)


def apply() -> None:
    """Patch the call sites listed in the module docstring (idempotent; nothing with CUDA)."""
    global _applied
    if _applied or not needed():
        return
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(*_a: Any, clone: bool = False, **_k: Any) -> torch.Tensor:
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state: torch.Tensor, *_a: Any, **_k: Any) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker.add = _cpu_rng_add
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    torch.cuda.synchronize = lambda *_a, **_k: None
    torch.cuda.current_stream = lambda *_a, **_k: _NullStream()  # type: ignore[assignment]
    _applied = True
