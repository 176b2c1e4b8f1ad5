"""Forgeline: from a workflow YAML to a production LLM endpoint.

The control plane: ``forgeline.spec`` (workflow models and loading), ``forgeline.plan`` (DAG,
resources, estimates, cache keys), ``forgeline.runtime`` (the Ray driver and the operator contract),
``forgeline.tracking`` (MLflow), ``forgeline.artifacts`` (manifests, model URIs, the stage store) and
``forgeline.cli``. Operators live in the separate ``forgeline_operators`` package.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("forgeline")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
