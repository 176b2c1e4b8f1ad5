"""Run a workflow with the test operators in a separate process (for kill -9 and Ctrl-C tests).

Usage: python drive.py WORKFLOW HOME KIND=OP [KIND=OP ...]; exit 0 ok, 1 failed, 130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import opkit
from forgeline.runtime import RunSettings, StageFailed, run_workflow
from forgeline.spec import load_workflow


def main() -> int:
    wf, home, *pairs = sys.argv[1:]
    kinds = dict(p.split("=", 1) for p in pairs)
    try:
        summary = run_workflow(
            load_workflow(wf), RunSettings(home=Path(home)), registry=opkit.registry(kinds)
        )
    except KeyboardInterrupt:
        return 130
    except StageFailed:
        return 1
    print(f"run_id={summary.run_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
