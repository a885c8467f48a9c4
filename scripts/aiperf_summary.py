#!/usr/bin/env python3
"""One line per aiperf run from its JSON export (profile_export_aiperf.json):
load (concurrency or request rate), requests, errors, output tok/s, requests/s,
TTFT p50/p99, ITL p50/p99, mean output length.

    python3 scripts/aiperf_summary.py [NAME=]RUN_DIR_OR_JSON [...] [--json OUT.json] [--markdown]
        [--bench-log LOG]   # also the offline `dist-infer bench` [BENCHMARK] lines of LOG, for comparison

A directory argument is searched for profile_export_aiperf.json (or any
*aiperf*.json when --profile-export-prefix renamed it). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = [  # (key, header, format)
    ("run", "run", "{}"),
    ("load", "load", "{}"),
    ("requests", "requests", "{:.0f}"),
    ("errors", "errors", "{:.0f}"),
    ("output_tok_s", "output tok/s", "{:,.1f}"),
    ("requests_s", "req/s", "{:.2f}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:.1f}"),
    ("itl_p50_ms", "ITL p50 (ms)", "{:.2f}"),
    ("itl_p99_ms", "ITL p99 (ms)", "{:.2f}"),
    ("osl_mean", "OSL mean", "{:.1f}"),
]


def find_export(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / "profile_export_aiperf.json").is_file():  # the whole run (phases/*/ hold per-phase copies)
        return path / "profile_export_aiperf.json"
    for pattern in ("*aiperf*.json", "phases/profiling/*aiperf*.json"):
        hits = sorted(p for p in path.glob(pattern) if not p.name.startswith("."))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"no aiperf JSON export (profile_export_aiperf.json) under {path}")


def _metric(data: dict, name: str, stat: str) -> float | None:
    m = data.get(name)
    if not isinstance(m, dict):
        return None
    value = m.get(stat)
    return float(value) if value is not None else None


def _load(config: dict) -> str:
    """'concurrency 16' or 'poisson 4.0 req/s' from the profiling phase of input_config."""
    phases = [p for p in config.get("phases", []) if p.get("kind", p.get("name")) == "profiling"]
    if not phases:
        return "?"
    p = phases[0]
    parts = []
    if p.get("rate") is not None:
        parts.append(f"{p.get('type', 'rate')} {p['rate']:g} req/s")
    if p.get("concurrency") is not None:
        parts.append(f"concurrency {p['concurrency']}")
    return ", ".join(parts) or str(p.get("type", "?"))


def summarize(export: Path, name: str | None = None) -> dict:
    data = json.loads(export.read_text())
    errors = _metric(data, "error_request_count", "avg") or 0.0
    if not errors and data.get("error_summary"):
        errors = float(sum(e.get("count", 1) for e in data["error_summary"]))
    row = {
        "run": name or (export.parent.name if export.name == "profile_export_aiperf.json" else export.stem),
        "load": _load(data.get("input_config", {})),
        "requests": _metric(data, "request_count", "avg"),
        "errors": errors,
        "output_tok_s": _metric(data, "output_token_throughput", "avg"),
        "requests_s": _metric(data, "request_throughput", "avg"),
        "ttft_p50_ms": _metric(data, "time_to_first_token", "p50"),
        "ttft_p99_ms": _metric(data, "time_to_first_token", "p99"),
        "itl_p50_ms": _metric(data, "inter_token_latency", "p50"),
        "itl_p99_ms": _metric(data, "inter_token_latency", "p99"),
        "osl_mean": _metric(data, "output_sequence_length", "avg"),
        "endpoint": data.get("input_config", {}).get("endpoint", {}).get("type"),
        "server_token_count": data.get("input_config", {}).get("endpoint", {}).get("use_server_token_count", False),
        "complete": bool(data.get("is_complete", True)) and not data.get("was_cancelled", False),
        "export": str(export),
    }
    return row


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def table(rows: list[dict], markdown: bool = False) -> str:
    headers = [h for _, h, _ in COLUMNS]
    cells = [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt_line = lambda vals: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([fmt_line(headers), fmt_line(["-" * w for w in widths])] + [fmt_line(c) for c in cells])


def bench_rows(log: Path) -> list[dict]:
    """The `[BENCHMARK] key value key value ...` lines `dist-infer bench` prints."""
    rows = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("[BENCHMARK] "):
            continue
        tokens = line[len("[BENCHMARK] "):].split()
        rows.append(dict(zip(tokens[::2], tokens[1::2])))
    return rows


def bench_table(rows: list[dict]) -> str:
    keys = [("batch_size", "batch"), ("tokens_per_sec", "tok/s"), ("percentile50(ms)", "step p50 (ms)"),
            ("percentile99(ms)", "step p99 (ms)"), ("ttft(ms)", "TTFT (ms)"), ("vocab_size", "vocab"),
            ("model_name", "model")]
    cells = [[r.get(k, "-") for k, _ in keys] for r in rows]
    headers = [h for _, h in keys]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="aiperf artifact dirs or JSON exports (NAME=PATH names a run)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table")
    ap.add_argument("--bench-log", type=Path, help="a `dist-infer bench` log: its [BENCHMARK] lines as a table too")
    args = ap.parse_args(argv)
    if args.bench_log:
        offline = bench_rows(args.bench_log) if args.bench_log.is_file() else []
        print(f"offline `dist-infer bench` ({args.bench_log}):")
        print(bench_table(offline) if offline else "  no [BENCHMARK] lines")
        print()
        print("HTTP server, aiperf:")
    rows = []
    for p in args.paths:
        name, _, path = str(p).rpartition("=") if "=" in str(p) else (None, "", str(p))
        try:
            rows.append(summarize(find_export(Path(path)), name or None))
        except (FileNotFoundError, json.JSONDecodeError) as exc:  # aiperf writes no export when every request failed
            rows.append({"run": name or Path(path).name, "load": "FAILED (no export)", "complete": False,
                         "errors": None, "endpoint": None, "server_token_count": None, "problem": str(exc)})
    print(table(rows, args.markdown))
    notes = sorted({f"{r['endpoint']} endpoint, output tokens counted by "
                    f"{'the server (usage)' if r['server_token_count'] else 'client-side tokenization'}" for r in rows if r["endpoint"]})
    for note in notes:
        print(note)
    for r in rows:
        if not r["complete"]:
            print(f"WARNING: run {r['run']} did not complete: {r.get('problem', 'cancelled or partial')}")
        if r["errors"]:
            print(f"WARNING: run {r['run']} had {r['errors']:.0f} failed requests")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
