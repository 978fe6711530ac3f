"""``python -m reports [--results DIR] [--experiment NAME] [--out DIR] [--tracking-uri URI]``.

The same as ``dmkd report``; useful before the CLI exists or without installing the package.
"""

from __future__ import annotations

import argparse
import sys

from harness.core.errors import UserError
from reports.build import report_from_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports", description="Write LEADERBOARD.md and report.html")
    p.add_argument("--results", default="results", help="results folder (default: results)")
    p.add_argument("--experiment", default=None, help="one experiment (default: all found)")
    p.add_argument("--out", default=None, help="output folder (default: <results>/report)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store to read, e.g. sqlite:///results/mlflow.db")
    a = p.parse_args(argv)
    try:
        paths = report_from_results(a.results, a.experiment, a.out, a.tracking_uri)
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
