"""`python -m imagetool` and the `imagetool` console script: streams and signals first, then the CLI.

Both come before the (slow) imports of the CLI, so a Ctrl-C or SIGTERM during start-up
is answered like one during the work: exit 128+N, one line, JSON if asked, no traceback.
"""

from __future__ import annotations

import sys


def _interrupted_outside(exc: BaseException) -> int:
    from imagetool import render, signals
    from imagetool.errors import ImagetoolError

    code = signals.exit_code(exc)
    if "--json" in sys.argv[1:] and not render.json_emitted():
        stopped = ImagetoolError(signals.message(exc), code="interrupted")
        render.emit_json(render.error_document("imagetool", stopped) | {"exit_code": code})
    render.error_line(signals.message(exc))
    return code


def main() -> int:
    from imagetool import signals, stdio
    from imagetool.errors import Interrupted

    stdio.make_safe()  # before any import opens a file
    signals.install()
    try:
        from imagetool.cli import main as cli_main

        return cli_main()
    except (KeyboardInterrupt, Interrupted) as exc:  # between the CLI's own handlers
        return _interrupted_outside(exc)


if __name__ == "__main__":
    sys.exit(main())
