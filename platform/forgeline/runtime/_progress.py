"""Progress of a run: a live rich table of stages on a TTY, plain timestamped lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

_STYLE = {
    "pending": "dim",
    "running": "yellow",
    "succeeded": "green",
    "cached": "cyan",
    "failed": "bold red",
    "killed": "red",
    "skipped": "dim",
}


def _key_metric(metrics: dict[str, float]) -> str:
    for name in ("perplexity", "loss", "token_accuracy", "registered_version"):
        if name in metrics:
            return f"{name}={metrics[name]:.4g}"
    if metrics:
        k = sorted(metrics)[0]
        return f"{k}={metrics[k]:.4g}"
    return ""


class Progress:
    """Callable progress sink for the driver: ``progress(stage, state, detail)``."""

    def __init__(self, stages: list[str], console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live_mode = self.console.is_terminal if live is None else live
        self.rows: dict[str, dict[str, Any]] = {
            s: {"state": "pending", "t0": None, "t1": None} for s in stages
        }
        self._live: Live | None = None

    def __enter__(self) -> Progress:
        if self.live_mode:
            self._live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)

    def __call__(self, stage: str, state: str, detail: dict[str, Any]) -> None:
        row = self.rows.setdefault(stage, {"state": "pending", "t0": None, "t1": None})
        now = time.time()
        if state == "running":
            row["t0"] = now
        elif state in ("succeeded", "failed", "cached", "killed", "skipped"):
            row["t1"] = now
        row["state"] = state
        row.update({k: v for k, v in detail.items() if k in ("metrics", "error", "key")})
        if self._live is not None:
            self._live.update(self._table())
        else:
            extra = ""
            if state == "cached":
                extra = f" key={str(detail.get('key', ''))[:12]}"
            if detail.get("metrics"):
                extra += " " + _key_metric(detail["metrics"])
            if detail.get("error"):
                extra += f" error: {detail['error']}"
            if detail.get("reason"):
                extra += f" ({detail['reason']})"
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp}] {stage}: {state}{extra}", file=sys.stderr, flush=True)

    def _table(self) -> Table:
        table = Table(title="forgeline", expand=False)
        for col in ("stage", "state", "time", "metric"):
            table.add_column(col)
        now = time.time()
        for name, row in self.rows.items():
            t0, t1 = row.get("t0"), row.get("t1")
            dur = f"{(t1 or now) - t0:.1f}s" if t0 else ""
            metric = row.get("error") or _key_metric(row.get("metrics") or {})
            state = row["state"]
            table.add_row(name, f"[{_STYLE.get(state, '')}]{state}[/]", dur, str(metric)[:80])
        return table
