"""Forgeline's built-in operators: one folder per stage kind, each a ``run(ctx)`` entrypoint.

``operator_specs()`` is what the ``forgeline.operators`` entry point returns: data only (kind,
backend, version, capabilities, dotted entrypoint), so planning never imports torch.
"""

from __future__ import annotations

from forgeline.registry import Capabilities, OperatorSpec

__all__ = ["operator_specs"]


def operator_specs() -> list[OperatorSpec]:
    return [
        OperatorSpec(
            kind="evaluate",
            entrypoint="forgeline_operators.evaluate.operator:run",
            version="1",
            capabilities=Capabilities(cpu=True, gpu=True),
            description="Perplexity, token accuracy and exact match with transformers; gates.",
        ),
        OperatorSpec(
            kind="register",
            entrypoint="forgeline_operators.register.operator:run",
            version="1",
            capabilities=Capabilities(cpu=True, gpu=True),
            description="Register a directory as an MLflow model version (by reference) and set an alias.",
        ),
    ]
