"""Render the fault matrix the tests measured (out/fault_matrix.json, written by
tests/launchers/fault_matrix.py) as the markdown table of docs/RELIABILITY.md.

    .venv/bin/python scripts/fault_matrix_table.py [--json out/fault_matrix.json]

One row per fault: what the user sees, then per launcher and topology the time it took
(fault -> /health 200 again, or -> exit) with the log line that named the rank."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULTS = ("kill -9 of rank 0", "kill -9 of a middle rank", "kill -9 of the last rank", "SIGSTOP of a rank",
          "SIGTERM to the launcher", "corrupted engine file found at restart")
CELLS = [(launcher, topology) for launcher in ("mpirun", "slurm", "ray") for topology in ("one host", "two hosts")]


def load_rows(path: Path) -> dict[tuple[str, str, str], dict]:
    return {(r["fault"], r["launcher"], r["topology"]): r for r in json.loads(path.read_text())}


def time_cell(row: dict | None) -> str:
    if row is None:
        return "not measured"
    named = row.get("rank") is not None and row["until"] != "exit"  # the rank that restarts were about
    where = f" (rank {row['rank']}" + (f" on {row['host']})" if row.get("host") else ")") if named else ""
    code = f", exit {row['exit_code']}" if row.get("exit_code") is not None else ""
    return f"{row['seconds']:.1f} s{code}{where}"


def summary_table(rows: dict) -> list[str]:
    """Faults x (launcher, topology): seconds from the fault to /health 200 again (or to the exit),
    with what the user sees (the same under every launcher)."""
    head = "| fault | what the user sees | " + " | ".join(f"{launcher}, {topology}" for launcher, topology in CELLS) + " |"
    lines = [head, "|" + "---|" * (len(CELLS) + 2)]
    for fault in FAULTS:
        sees = next((r["user_sees"] for (f, *_), r in rows.items() if f == fault), "")
        times = " | ".join(time_cell(rows.get((fault, *cell))) for cell in CELLS)
        lines.append(f"| {fault} | {_cell(sees)} | {times} |")
    return lines


def detail_table(rows: dict) -> list[str]:
    """The line the supervisor logged (what died, named by the launcher or the ranks' watchdog),
    per fault and launcher: the two-host run's where measured."""
    lines = ["| fault | launcher | the supervisor's log line | test |", "|---|---|---|---|"]
    for fault in FAULTS:
        for launcher in ("mpirun", "slurm", "ray"):
            row = rows.get((fault, launcher, "two hosts")) or rows.get((fault, launcher, "one host"))
            if row is not None:
                test = row["test"].split("[")[0]
                lines.append(f"| {fault} | {launcher} ({row['topology']}) | `{_cell(row['log_line'])}` | `{test}` |")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=REPO / "out" / "fault_matrix.json")
    args = p.parse_args(argv)
    if not args.json.is_file():
        print(f"{args.json} does not exist: run the fault matrix tests first "
              "(pytest tests/launchers/test_faults_*.py).", file=sys.stderr)
        return 2
    rows = load_rows(args.json)
    dates = sorted({r["measured"] for r in rows.values()})
    print(f"Seconds from the fault to `/health` 200 again (restarts) or to the exit (SIGTERM, corrupt file); "
          f"measured {', '.join(dates)} by the tests named below.\n")
    print("\n".join(summary_table(rows)) + "\n")
    print("\n".join(detail_table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
