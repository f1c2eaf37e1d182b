"""The `rankfeed` console script: the command line, run from the extension module (the same code
as the `rankfeed` binary the Rust build makes), so `pip install ./python` puts `rankfeed` on
PATH."""

import os
import signal
import sys


def main():
    # As the native binary: Ctrl-C ends the process (the command runs in Rust, without the
    # GIL, so Python's handler would only run after it).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from ._rankfeed import _cli
    sys.stdout.flush()
    code = _cli([os.path.basename(sys.argv[0]) or "rankfeed", *sys.argv[1:]])
    sys.exit(code)


if __name__ == "__main__":
    main()
