"""Triton python-backend model that routes each request to the engine serving its LoRA adapter.

Copied verbatim into a model repository as ``<model>/1/model.py`` by :mod:`.repository` when the serve
stage has adapters; it runs in Triton's python stub, so it imports nothing from Forgeline.

Why a router: OpenVINO GenAI's ``ContinuousBatchingPipeline`` (2026.4) applies LoRA adapters only in
``generate()``; ``add_request()``/``step()`` ignore a request's ``GenerationConfig.adapters`` and run
with whatever ``generate()`` applied last (measured: tokens identical to the base model). So every
adapter gets its own engine model (``<model>__<adapter>``, the adapter applied once at load) next to
``<model>__base``, and this model keeps the one name and the one I/O contract the OpenAI front talks
to: it reads ``lora_name``, forwards the request (without ``lora_name``) to that engine with a
decoupled BLS call from a worker thread, and streams the engine's responses back as they come.

Limitation (measured): Triton 2.51 cannot cancel a BLS request, so when a client goes away the router
stops streaming but the adapter's engine runs that request to its ``max_tokens``. Forgeline's OpenAI
front therefore does not use the router: it reads the manifest's ``routes`` (adapter → engine model)
and calls the engines directly, so its clients' disconnects cancel in the engine; the router serves
clients that talk to Triton itself with a ``lora_name``.

The engines are loaded by this model (``pb_utils.load_model``; the server runs with explicit model
control) when the first request arrives, unless they are loaded already, and stay loaded after it is
unloaded (see ``finalize``). Not earlier: this model is loaded during the server's startup, when loads
are refused ("Server not ready"), and a load issued from a thread while the server was still starting
crashed tritonserver 2.51 (boost::interprocess::lock_exception). The local deploy target starts the
server with every entry of the manifest's ``models`` (``--load-model``), so nothing loads late there.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
OUTPUTS = ["text_output", "output_ids", "finish_reason", "prompt_tokens", "completion_tokens"]


def _lora(request: Any) -> str:
    tensor = pb_utils.get_input_tensor_by_name(request, "lora_name")
    if tensor is None:
        return ""
    values = tensor.as_numpy().reshape(-1)
    if values.size == 0:
        return ""
    value = values[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _finished(response: Any) -> bool:
    """The engine sets ``finish_reason`` on its last response only."""
    tensor = pb_utils.get_output_tensor_by_name(response, "finish_reason")
    if tensor is None:
        return False
    values = tensor.as_numpy().reshape(-1)
    return values.size > 0 and bool(values[0])


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        self.routes: dict[str, str] = json.loads(params["routes"]["string_value"])
        self._engines = sorted(set(self.routes.values()))
        self._live: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._loaded = False

    def _ensure_engines(self) -> None:
        """Load the engines that are not loaded yet (once; later requests find them ready)."""
        with self._load_lock:
            if self._loaded:
                return
            for engine in self._engines:
                if not pb_utils.is_model_ready(model_name=engine):
                    pb_utils.load_model(model_name=engine)
            self._loaded = True

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            lora = _lora(request)
            engine = self.routes.get(lora)
            if engine is None:
                known = sorted(k for k in self.routes if k)
                message = f"unknown LoRA adapter {lora!r}; served adapters: {known}"
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
                continue
            inputs = [t for t in request.inputs() if t.name() != "lora_name"]
            worker = threading.Thread(
                target=self._forward, args=(request, sender, engine, inputs), daemon=True
            )
            with self._lock:
                self._live.add(worker)
            worker.start()
        return None

    def _forward(self, request: Any, sender: Any, engine: str, inputs: list[Any]) -> None:
        final_sent = False
        try:
            self._ensure_engines()
            bls = pb_utils.InferenceRequest(model_name=engine, inputs=inputs, requested_output_names=OUTPUTS)
            responses = bls.exec(decoupled=True)
            for response in responses:
                if response.has_error():
                    sender.send(pb_utils.InferenceResponse(error=response.error()), flags=FINAL)
                    final_sent = True
                    break
                tensors = response.output_tensors()
                if not tensors:  # the engine's bare final flag
                    continue
                last = _finished(response)
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if last else 0)
                final_sent = last
                if last:
                    break
                if request.is_cancelled():
                    # BLS requests cannot be cancelled in Triton 2.51: stop reading and drop the
                    # iterator; the engine finishes the request on its own.
                    cancel = getattr(responses, "cancel", None)
                    if cancel is not None:
                        cancel()
                    break
            del responses
            if not final_sent:
                sender.send(flags=FINAL)
        except Exception as e:  # a broken request fails alone
            if not final_sent:
                with contextlib.suppress(Exception):
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
        finally:
            with self._lock:
                self._live.discard(threading.current_thread())

    def finalize(self) -> None:
        # The engines stay loaded: on a reload (promotion) Triton finalizes this instance only after
        # the new one has loaded them again, so unloading here would take them from the new router.
        # They go with the server, or by name through the repository API.
        with self._lock:
            workers = list(self._live)
        for worker in workers:
            worker.join(timeout=60)
