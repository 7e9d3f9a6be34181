"""
The plumbing every command shares, written once: the error type for bad input;
the wrapper that turns it into one line and exit code 2; the matplotlib set-up of every figure.

    require(cfg.lr > 0, f"--lr {cfg.lr}: the learning rate must be > 0")  # UsageError when false

    @command        # `gpt.py --top-k 0` -> "gpt.py: error: --top-k 0: ...", exit 2, no traceback
    def main(argv=None): ...

    plt = pyplot()  # matplotlib drawing into files, never a window (works without a display)
"""

import functools
import os
import sys


class UsageError(ValueError):
    """Bad input: printed as one line, exit code 2, nothing written.
    A ValueError, so the ordinary `except ValueError` still catches it."""


def require(ok, message):
    """Raise UsageError(message) unless ok. require(2 > 1, "never raised") -> None"""
    if not ok:
        raise UsageError(message)


def command(main):
    """Wrap a command's main(argv).
    A UsageError becomes "<file>.py: error: <message>" on stderr and exit code 2.
    Under torchrun every process fails alike, so only rank 0 prints it."""
    prog = main.__module__.rsplit(".", 1)[-1] + ".py"
    if prog == "__main__.py":
        prog = os.path.basename(sys.argv[0])

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except UsageError as e:
            if os.environ.get("RANK", "0") == "0":
                print(f"{prog}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped


def pyplot():
    """matplotlib.pyplot drawing into files (Agg backend). Imported only when a figure is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
