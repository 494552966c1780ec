#!/usr/bin/env python
"""Submit a run to a cluster: `launchers/submit.py --cluster NAME --config X.yaml [--dry-run] [key=value ...]`.

The logic lives in recpre/launch/; profiles in launchers/clusters/. See docs/launching.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recpre.errors import run_cli  # noqa: E402
from recpre.launch.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
