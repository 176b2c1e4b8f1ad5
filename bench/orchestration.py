"""Orchestration benchmark: plan time, Ray dispatch overhead per stage, cached/cold quickstart ratio.

Every figure is printed next to a baseline measured in the same process:
  1. load + plan of a 50-stage synthetic workflow (and of the quickstart, for scale);
  2. per-stage overhead of the driver (MLflow child run, cache key, Ray task, atomic publish) for
     no-op stages, against a bare ``ray.get(f.remote())`` round trip;
  3. the quickstart: a cold run (fresh state) against a cached rerun (target ratio <= 0.05).

Run: ``.venv/bin/python bench/orchestration.py`` (or ``make bench``). Not part of the test suite.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from forgeline.registry import OperatorRegistry, OperatorSpec, default_registry  # noqa: E402
from forgeline.runtime import RaySettings, RunSettings, make_planner, run_workflow  # noqa: E402
from forgeline.runtime._ray import ensure_ray  # noqa: E402
from forgeline.spec import load_workflow  # noqa: E402
from forgeline.tracking import TrackingSettings, prepare  # noqa: E402


def synthetic(n: int, tmp: Path) -> Path:
    (tmp / "d.jsonl").write_text('{"text": "hello"}\n')
    lines = [
        "name: synthetic",
        "model: {base: builtin://tiny-llama}",
        "data: {d: {path: d.jsonl, format: text}}",
        "stages:",
    ]
    for i in range(n):
        # A DAG, not a chain: each stage reads the output of the one two back.
        model = "${model}" if i < 2 else f"${{stages.s{i - 2}.outputs.report}}"
        lines.append(
            f"  - {{name: s{i}, kind: evaluate, dataset: d, model: '{model}', max_samples: {i + 1}}}"
        )
    path = tmp / f"synthetic-{n}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(fn, repeat: int = 5) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def bench_plan(tmp: Path) -> None:
    home = tmp / "plan-home"
    wf50 = synthetic(50, tmp)
    quick = ROOT / "workflows" / "quickstart-tiny.yaml"

    def plan(path: Path) -> None:
        make_planner(load_workflow(path), home).build()

    t_quick = timed(lambda: plan(quick))
    t50 = timed(lambda: plan(wf50))
    print(f"plan  quickstart ({len(load_workflow(quick).workflow.stages)} stages): {t_quick * 1e3:8.1f} ms")
    print(
        f"plan  synthetic 50 stages:               {t50 * 1e3:8.1f} ms  ({t50 / t_quick:.1f}x the quickstart)"
    )


def bench_dispatch(tmp: Path, n: int = 12) -> None:
    import ray

    registry = OperatorRegistry(models=default_registry().models())
    registry.add_operator(OperatorSpec(kind="evaluate", entrypoint="_noop:run", version="bench"))

    @ray.remote(num_cpus=1)
    def bare() -> int:
        return 1

    ray.get(bare.remote())  # warm a worker
    t_bare = timed(lambda: ray.get(bare.remote()), repeat=20)

    wf = synthetic(n, tmp)
    home = tmp / "dispatch-home"
    settings = RunSettings(home=home, use_cache=False)
    prepare(TrackingSettings(f"sqlite:///{home / 'mlflow.db'}", "synthetic", home / "artifacts" / "mlflow"))
    loaded = load_workflow(wf)
    run_workflow(loaded, settings, registry=registry)  # warm: imports in workers, DB pages
    t0 = time.perf_counter()
    run_workflow(loaded, settings, registry=registry)
    per_stage = (time.perf_counter() - t0) / n
    print(f"dispatch bare ray.get(f.remote()):        {t_bare * 1e3:8.1f} ms")
    print(
        f"dispatch forgeline stage (no-op operator): {per_stage * 1e3:8.1f} ms per stage "
        f"({per_stage / t_bare:.0f}x bare Ray; includes MLflow child run, key, publish)"
    )


def bench_quickstart(tmp: Path) -> None:
    from forgeline_operators.deploy.endpoint import stop_all

    home = tmp / "quick-home"
    loaded = load_workflow(ROOT / "workflows" / "quickstart-tiny.yaml")
    settings = RunSettings(home=home, ray=RaySettings())
    try:
        t0 = time.perf_counter()
        run_workflow(loaded, settings)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = run_workflow(loaded, settings)
        cached = time.perf_counter() - t0
    finally:
        stop_all(home)  # the quickstart leaves its endpoint running by design
    assert {o.state for o in summary.stages.values()} == {"cached"}, summary.stages
    print(f"quickstart cold run (fresh state):        {cold:8.2f} s")
    print(f"quickstart cached rerun:                  {cached:8.2f} s")
    verdict = "ok" if cached / cold <= 0.05 else "ABOVE TARGET"
    print(f"ratio cached / cold:                      {cached / cold:8.3f}  (target <= 0.05: {verdict})")


def main() -> None:
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="forgeline-bench-"))
    try:
        bench_plan(tmp)
        # The quickstart first: its cold run includes starting the embedded Ray, as a user's would.
        bench_quickstart(tmp)
        ensure_ray(RaySettings(num_cpus=2))  # the embedded settings the driver uses
        bench_dispatch(tmp)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
