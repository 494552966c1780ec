#!/usr/bin/env python
"""Submit a run to a cluster: `launchers/submit.py --cluster NAME --config X.yaml [--dry-run] [key=value ...]`.

The same command as `recpre-submit`; the logic lives in recpre/launch/, profiles in launchers/clusters/. See
docs/launching.md.
"""

from recpre.launch.command import main

if __name__ == "__main__":
    raise SystemExit(main())
