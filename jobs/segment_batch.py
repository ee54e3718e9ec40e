"""Entry point for ``ray job submit --working-dir . -- python jobs/segment_batch.py --manifest ... --output ...``.

Takes the same options as ``ray-app batch`` and joins the cluster the job was submitted to.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, for an uninstalled checkout

from ray_app.adapters.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
