"""CLI command ``forgeline render FILE``: print (or write) every Kubernetes manifest a workflow would
create, validated offline against the real schemas, for GitOps instead of applying. Thin: the objects
come from :mod:`forgeline_operators.kube.render` (imported inside the command, so ``--help`` stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)


def render(
    file: Annotated[Path, typer.Argument(help="Workflow YAML.")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write DIR/<workflow>.yaml instead of printing.")
    ] = None,
    on: Annotated[
        str | None,
        typer.Option("--on", help="`kubernetes`: add the KubeRay RayJob that runs the whole workflow."),
    ] = None,
    namespace: Annotated[
        str, typer.Option("--namespace", "-n", help="Namespace of builds and jobs.")
    ] = "default",
    artifacts_pvc: Annotated[
        str, typer.Option("--artifacts-pvc", help="PVC holding the artifact root.")
    ] = "forgeline-artifacts",
) -> None:
    """Render the workflow's Kubernetes manifests (ModelEndpoint + children, EngineBuild + Job, NeMo jobs)."""
    from forgeline.spec import WorkflowError, load_workflow
    from forgeline_operators.deploy.manifests import ManifestError
    from forgeline_operators.finetune.nemo.render import RenderError
    from forgeline_operators.kube.render import RenderSettings, render_workflow, to_yaml
    from forgeline_operators.kube.validate import validate_manifests

    if on not in (None, "kubernetes"):
        err.print(f"error: --on {on!r}: the only cluster is `kubernetes`", markup=False, style="red")
        raise typer.Exit(2)
    try:
        loaded = load_workflow(file)
    except WorkflowError as e:
        err.print(str(e), markup=False, highlight=False)
        raise typer.Exit(1) from None
    settings = RenderSettings(
        namespace=namespace, artifacts_pvc=artifacts_pvc, on_kubernetes=on == "kubernetes"
    )
    try:
        docs = render_workflow(loaded, settings)
    except (ManifestError, RenderError, ValueError) as e:
        err.print(f"error: {file}: {e}", markup=False, highlight=False, style="red")
        raise typer.Exit(1) from None
    if not docs:
        err.print(
            f"{file}: nothing to render (no deploy stage with target kubernetes, tensorrt-llm build or nemo "
            "finetune)",
            markup=False,
        )
        raise typer.Exit(1)
    problems = validate_manifests([d.obj for d in docs])
    if problems:
        for p in problems:
            err.print(f"invalid: {p}", markup=False, highlight=False, style="red")
        raise typer.Exit(1)
    text = to_yaml(
        docs, f"Rendered by `forgeline render {file}`; validated offline (Kubernetes 1.31, CRD schemas)."
    )
    if out_dir is None:
        print(text, end="")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{loaded.workflow.name}.yaml"
    target.write_text(text)
    err.print(f"wrote {target} ({len(docs)} objects)", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(render)
