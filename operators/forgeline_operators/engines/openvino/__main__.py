"""``python -m forgeline_operators.engines.openvino HF_DIR OUT_DIR [WEIGHT_FORMAT]``: :func:`.ir.export_ir`
in a process of its own.

The engine's ``prepare`` runs the export here so that it is pinned to the caller's threads
(``OMP_NUM_THREADS`` is read when torch starts, so it cannot be set in a process that already has it)
and so that torch and optimum never load into the serve stage's or the CLI's process.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from forgeline_operators.engines.openvino.ir import export_ir


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    hf_dir, out_dir = Path(argv[0]), Path(argv[1])
    weight_format = argv[2] if len(argv) == 3 else "fp32"
    with tempfile.TemporaryDirectory(prefix="forgeline-ov-export-", dir=out_dir.parent) as scratch:
        export_ir(hf_dir, out_dir, weight_format, Path(scratch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
