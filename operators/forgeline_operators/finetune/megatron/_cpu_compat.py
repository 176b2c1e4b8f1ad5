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

- ``megatron.core.tensor_parallel.layers.fused_weight_gradient_mlp_cuda`` (and the module's
  ``_grad_accum_fusion_available`` flag): APEX's CUDA kernel behind ``gradient_accumulation_fusion``,
  replaced by :class:`_CpuWgradAccum`, the same operation on CPU (``main_grad += dYᵀ·X`` as one
  ``addmm_``). Without it every weight gradient is a fresh tensor that the DDP hook then adds into
  the grad buffer (an extra allocation, write and read of every weight-sized gradient per
  micro-batch). Megatron's own code path is unchanged: its backward calls the kernel and hands DDP a
  dummy gradient marked ``grad_added_to_main_grad``.

- ``megatron.core.optimizer.clip_grads.multi_tensor_scale_impl``: without APEX/TE megatron falls back
  to ``local_multi_tensor_scale`` (``dst.copy_(src * scale)``: a new tensor and a copy per gradient),
  which gradient clipping calls with ``src is dst``; :func:`_cpu_multi_tensor_scale` scales in place
  there (the same float32 multiply).

- ``megatron.core.fusions.fused_softmax.get_default_causal_mask``: builds the causal mask with
  ``device="cuda"``; :class:`CpuDeviceMode` covers it in the forward pass, but activation recompute
  runs the layer's forward again inside autograd's backward, where the mode is not active. Replaced
  by :func:`_causal_mask` (the same boolean mask, on CPU, cached per length).

- Not a patch but a replacement the engine calls: :func:`zero_grad_buffer` zeroes the grad buffer
  except the fused-wgrad weights, whose first kernel call of a step overwrites instead of adding
  (:func:`zero_unwritten` zeroes any left unwritten before megatron finalises the gradients). The
  whole-buffer fill measured 18 ms of a ~450 ms step on the ~30M-param bench model.

These together took megatron TP=1 on that model from 0.7-0.9x to 1.05-1.08x the hf backend's tokens/s
(``bench/finetune_parallel.py``, with pad-to-longest batches and the loss scaled before backward).

Keep ``apply_rope_fusion`` and ``sequence_parallel`` off on CPU; ``gradient_accumulation_fusion``
is on exactly when this layer is applied (the model config in :mod:`.model` does both). Untested
here: nothing of this is used with CUDA present.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CpuDeviceMode", "apply", "cpu_mode", "needed", "zero_grad_buffer", "zero_unwritten"]

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


# main_grad views (by data pointer) not written yet this step: see zero_grad_buffer
_unwritten: dict[int, torch.Tensor] = {}


class _CpuWgradAccum:
    """CPU stand-in for APEX's ``fused_weight_gradient_mlp_cuda`` (the call megatron makes when
    ``gradient_accumulation_fusion`` is on): accumulate the weight gradient straight into the DDP
    grad buffer. ``inputs`` is ``[tokens, in]``, ``grad_output`` ``[tokens, out]``, ``main_grad``
    ``[out, in]`` -- the shapes megatron passes (``prepare_input_tensors_for_wgrad_compute``). The
    first write of a step to a buffer :func:`zero_grad_buffer` left unzeroed overwrites it."""

    @staticmethod
    def wgrad_gemm_accum_fp32(
        inputs: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
    ) -> None:
        # bf16 training hands bf16 activations with an fp32 buffer: APEX accumulates those in fp32
        if inputs.dtype != main_grad.dtype:
            inputs, grad_output = inputs.to(main_grad.dtype), grad_output.to(main_grad.dtype)
        if _unwritten.pop(main_grad.data_ptr(), None) is not None:
            torch.mm(grad_output.t(), inputs, out=main_grad)
        else:
            main_grad.addmm_(grad_output.t(), inputs)

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def _fused_wgrad_weights(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Weights whose gradient only ever reaches the grad buffer through the wgrad kernel: trainable
    ``weight`` s of megatron's parallel linears with gradient-accumulation fusion on (a tied output
    layer has no weight of its own and is not among them)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    out = []
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if (
            isinstance(m, ColumnParallelLinear | RowParallelLinear)
            and getattr(m, "gradient_accumulation_fusion", False)
            and isinstance(weight, torch.nn.Parameter)
            and weight.requires_grad
        ):
            out.append(weight)
    return out


def zero_grad_buffer(ddp: Any) -> None:
    """``DistributedDataParallel.zero_grad_buffer`` without filling the fused-wgrad weights' part.

    The whole-buffer fill is a write of every trainable float (~4 % of a step on the bench's ~30M
    model, memory-bound); the weights in :func:`_fused_wgrad_weights` get their first gradient of
    the step by an overwriting GEMM instead, and any of them not written by the end of backward is
    zeroed then (:func:`zero_unwritten`, called before megatron's gradient finalisation). Every other
    gradient (norms, embeddings, LoRA) is zeroed here as before. Without the compat layer this is
    megatron's own call.
    """
    if not _applied:
        ddp.zero_grad_buffer()
        return
    fused = getattr(ddp, "_forgeline_fused_wgrad", None)
    if fused is None:
        fused = {id(p) for p in _fused_wgrad_weights(ddp.module)}
        ddp._forgeline_fused_wgrad = fused
    for param in ddp.params_with_grad:
        param.grad_added_to_main_grad = False
    for bucket_group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
        bucket_group.reset()
    _unwritten.clear()
    for param in ddp.params_with_grad:
        if id(param) in fused:
            _unwritten[param.main_grad.data_ptr()] = param.main_grad
        else:
            param.main_grad.zero_()


def zero_unwritten() -> None:
    """Zero the fused-wgrad buffers that received no gradient this step (see zero_grad_buffer)."""
    for grad in _unwritten.values():
        grad.zero_()
    _unwritten.clear()


def _cpu_multi_tensor_scale(
    _chunk_size: int, _noop_flag: Any, tensor_lists: list[list[torch.Tensor]], scale: float
) -> None:
    """``amp_C.multi_tensor_scale`` semantics (``dst = src * scale``) without a temporary per tensor."""
    for src, dst in zip(tensor_lists[0], tensor_lists[1], strict=True):
        if src is dst:
            dst.mul_(scale)
        else:
            torch.mul(src, scale, out=dst)


@functools.lru_cache(maxsize=64)
def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


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
    from megatron.core.fusions import fused_softmax
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import layers as mlayers
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
    mlayers.fused_weight_gradient_mlp_cuda = _CpuWgradAccum
    mlayers._grad_accum_fusion_available = True
    clip_grads.multi_tensor_scale_impl = _cpu_multi_tensor_scale
    fused_softmax.get_default_causal_mask = _causal_mask
    _applied = True
