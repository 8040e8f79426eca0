"""The summary of a sweep (`hsci train -m ...`): every job's outcome, best first, when the sweep ends."""

import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hsci import interrupt, report


class SweepSummary(Callback):
    """Hydra callback: reads each job's summary.json, prints a table, writes sweep_summary.{csv,json}.

    The command exits non-zero when any job did not complete: 128 + the signal's number after a stop signal.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sorted((job_row(d) for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()), key=rank)
        if not rows:
            return
        from hsci import rundir  # imports torch: kept out of start-up, where Hydra makes this callback

        rundir.write_json(sweep_dir / "sweep_summary.json", {"jobs": rows})
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
        report.sweep_table(rows, str(sweep_dir / "sweep_summary.csv"))
        if any(row["status"] != "completed" for row in rows):
            report.error(f"{sum(row['status'] != 'completed' for row in rows)} of {len(rows)} jobs did not complete")
            sys.exit(interrupt.exit_code() if interrupt.requested() else 1)


def job_row(job_dir: Path) -> dict:
    """One job as a flat row: overrides, status, best validation metric, test metrics, duration."""
    try:
        s = json.loads((job_dir / "summary.json").read_text())
    except (OSError, ValueError):
        s = {"status": "failed", "error": "no readable summary.json"}
    row = {"job": job_dir.name, "overrides": " ".join(s.get("overrides", [])), "status": s["status"]}
    if s.get("monitor"):
        row[f"best_{s['monitor']}"] = s["best_val"][s["monitor"]]
        row["mode"] = s["mode"]
    row |= {f"test_{k}": v for k, v in s.get("test", {}).items()}
    row |= {"duration_s": s.get("duration_s"), "error": s.get("error", ""), "run_dir": str(job_dir)}
    return row


def rank(row: dict) -> tuple:
    """Completed jobs first, best validation metric first; then the rest by job number."""
    best = next((v for k, v in row.items() if k.startswith("best_")), None)
    if row["status"] != "completed" or best is None:
        return (1, 0.0, int(row["job"]) if row["job"].isdigit() else 0)
    return (0, -best if row["mode"] == "max" else best, 0)
