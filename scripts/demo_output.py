"""What the demo shows and keeps: the step table (live and final), each step's latest log line, timings.json."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path

from demo_schedule import StepRecord
from rich import box
from rich.table import Table

# The logging prefix of the services, e.g. "2026-12-01 10:39:21,583 INFO oal_trainer.fit: "
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ [A-Z]+ [\w.]+: ")


def last_line(path: Path) -> str:
    """The last line a step wrote, without the logging prefix: its latest progress."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return ""
    return LOG_PREFIX.sub("", lines[-1]) if lines else ""


def step_table(records: dict[str, StepRecord], log_of, logs: Path, width: int, total_s: float | None = None) -> Table:
    """The steps as a table: live (with each running step's last log line) or final (with its log)."""
    table = Table(title=f"make demo (logs in {logs})", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column, width in (("step", 19), ("state", 7), ("lane", 4), ("start", 5), ("took", 5)):
        justify = "left" if column in ("step", "state") else "right"  # times in seconds
        table.add_column(column, justify=justify, no_wrap=True, min_width=width)
    # what is left of the terminal's width, so the fixed columns never get squeezed out
    rest = max(24, width - 19 - 7 - 4 - 7 - 6 - 12)
    table.add_column("log" if total_s is not None else "progress", no_wrap=True, overflow="ellipsis", max_width=rest)
    styles = {"done": "green", "reused": "cyan", "running": "yellow", "failed": "red", "stopped": "red"}
    for name, r in records.items():
        last = r.detail if total_s is None else ("" if r.state in ("reused", "waiting") else log_of(name))
        table.add_row(
            name,
            f"[{styles.get(r.state, 'dim')}]{r.state}[/]",
            str(r.lane or ""),
            "" if r.start_s is None else f"{r.start_s:.0f}",
            "" if r.seconds is None else f"{r.seconds:.0f}",
            last,
        )
    if total_s is not None:
        busy = sum(r.seconds or 0 for r in records.values())
        table.caption = (
            f"times in s; wall {total_s:.0f} s ({total_s / 60:.1f} min); the steps' seconds add up to {busy:.0f} s"
        )
    return table


def write_timings(path: Path, args, records: dict[str, StepRecord], total_s: float, load_start) -> None:
    record = {
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset,
        "cores": len(os.sched_getaffinity(0)),
        "lanes": args.lanes,
        "threads_per_process": args.threads,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "total_s": round(total_s, 1),
        "steps": {
            name: {"state": r.state, "lane": r.lane, "start_s": _round(r.start_s), "seconds": _round(r.seconds)}
            for name, r in records.items()
        },
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
