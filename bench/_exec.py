"""``python -m bench._exec LIFETIME CMD...``: exec CMD with a bounded life.

Sets the parent-death signal (the child dies with the harness), an alarm of
LIFETIME seconds (alarms survive exec; SIGALRM's default action ends the
process), and raises RLIMIT_NOFILE to its hard limit; then replaces itself with
CMD, so CMD keeps this process id (the one psutil measures).
"""

from __future__ import annotations

import os
import sys

from .baselines._shared import arm


def main() -> None:
    lifetime = float(sys.argv[1])
    cmd = sys.argv[2:]
    arm(lifetime)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
