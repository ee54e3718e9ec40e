"""Entry point for ``ray job submit --working-dir . -- python jobs/cost_report.py --summary s3://.../summary.parquet
--scans-per-month 10000``: the cost table for a finished job (same options as ``ray-app cost``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, for an uninstalled checkout

from ray_app.adapters.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["cost", *sys.argv[1:]]))
