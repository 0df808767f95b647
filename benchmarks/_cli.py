"""What the benchmark scripts share: running ``llmshrink`` as a user does and reading its ``--json`` answer."""

from __future__ import annotations

import subprocess
import sys


def sh(*args: str, check: bool = True) -> str:
    """Run ``llmshrink ARGS`` (this interpreter's), echo the command, return its stdout.

    stdout is the command's ``--json`` answer; its progress (stderr) passes through, so a long run
    can be watched. ``check=False`` keeps the answer of a command that exits non-zero on purpose
    (``validate`` outside its tolerance exits 4 and still prints its verdict).
    """
    print("$ llmshrink " + " ".join(args), file=sys.stderr)
    res = subprocess.run([sys.executable, "-m", "llmshrink", *args], check=check, stdout=subprocess.PIPE, text=True)
    return res.stdout
