"""`python -m imagetool` and the `imagetool` console script: streams made safe, then the CLI."""

from __future__ import annotations

import sys


def main() -> int:
    from imagetool import stdio

    stdio.make_safe()  # before any import opens a file
    from imagetool.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
