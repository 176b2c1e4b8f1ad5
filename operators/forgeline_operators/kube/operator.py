"""The Forgeline operator process: ``python -m forgeline_operators.kube.operator`` runs every controller
(``EngineBuild``: :mod:`forgeline_operators.build.controller`; ``ModelEndpoint``:
:mod:`forgeline_operators.deploy.controller`) in one kopf event loop. This is what the operator
Deployment under ``k8s/`` runs; tests run the same modules in-process with kopf's ``KopfRunner``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import kopf

__all__ = ["CONTROLLERS", "load_controllers", "main"]

CONTROLLERS = ("forgeline_operators.build.controller", "forgeline_operators.deploy.controller")
_log = logging.getLogger("forgeline.operator")


def load_controllers() -> list[str]:
    """Import every controller module (importing registers its kopf handlers); returns those loaded."""
    loaded = []
    for name in CONTROLLERS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a controller whose own imports fail is a broken install: say so
                raise
            _log.warning("controller %s is not part of this install; its resources are not reconciled", name)
            continue
        loaded.append(name)
    return loaded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m forgeline_operators.kube.operator", description=__doc__)
    p.add_argument("--namespace", "-n", action="append", default=[], help="watch only these namespaces")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint URL")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    loaded = load_controllers()
    _log.info("controllers: %s", ", ".join(loaded))
    kopf.run(
        standalone=True,  # one replica (the Deployment's strategy is Recreate): no peering CRDs needed
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
