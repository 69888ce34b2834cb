"""Console entry point: runs the Typer app and turns library errors into one line, exit 2."""

from __future__ import annotations

import os
import sys
import warnings

from ..errors import DpsynthError, Interrupted, PeerStopped
from .flags import torchrun_follower


def main(argv: list[str] | None = None) -> int:
    if not os.environ.get("DPSYNTH_DEBUG"):
        # Third-party deprecation chatter (opacus, clean-fid, SciPy) is noise on a CLI's stderr.
        warnings.filterwarnings("ignore")
    from .app import app
    from . import flags as cli_flags
    from .flags import all_flags, command_flags, to_flags

    cli_flags.HINTS.update(all_flags(app))
    cli_flags.INVOKED[:] = list(sys.argv[1:] if argv is None else argv)
    from ..notices import NOTICES
    NOTICES.clear()  # this command's notes only (library calls made earlier in the process are not its)
    try:
        app(args=argv, standalone_mode=False, prog_name="dpsynth")
    except Interrupted as exc:
        if not torchrun_follower():  # rank 0 says it once for all ranks
            sys.stderr.write(f"interrupted: {exc}\n")
        return 130
    except PeerStopped:  # rank 0 stopped before training and said why
        return 2
    except DpsynthError as exc:
        if os.environ.get("DPSYNTH_DEBUG"):
            raise
        flags = command_flags(app, argv if argv is not None else sys.argv[1:])
        sys.stderr.write(f"error: {to_flags(str(exc), flags, cli_flags.HINTS)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except SystemExit as exc:
        _print_notices()
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        usage = _usage_error(exc)
        if usage is None or os.environ.get("DPSYNTH_DEBUG"):
            raise
        sys.stderr.write(f"error: {usage}\n")
        return 2
    _print_notices()
    return 0


def _print_notices() -> None:
    # One-time messages from the library (e.g. a legacy manifest migrated), said once, on stderr.
    from ..notices import NOTICES  # torch-free: printed after every command, --help included
    from .flags import HINTS, to_flags

    for notice in dict.fromkeys(NOTICES):
        sys.stderr.write(f"note: {to_flags(notice, {}, HINTS)}\n")
    NOTICES.clear()


def _usage_error(exc: Exception) -> str | None:
    # Typer re-exports click's exception classes; we only read their public message.
    format_message = getattr(exc, "format_message", None)
    if callable(format_message) and getattr(exc, "exit_code", None) == 2:
        message = _named_value(exc) or " ".join(format_message().split())
        ctx = getattr(exc, "ctx", None)
        command = f" (see 'dpsynth {ctx.info_name} --help')" if ctx is not None and ctx.info_name != "dpsynth" else ""
        return message + command
    return None


def _named_value(exc: Exception) -> str | None:
    """'--eps 10% is not allowed; input should be a valid number' for a value Typer could not convert:
    its own message ("Invalid value for '--eps': Input should be a valid number") drops the value.
    Typer converts with pydantic and chains the ValidationError, whose errors() carry the input."""
    param, cause = getattr(exc, "param", None), exc.__cause__
    errors = getattr(cause, "errors", None)
    if param is None or not callable(errors):
        return None
    try:
        first = errors()[0]
        value, reason = first["input"], str(first["msg"])
    except (IndexError, KeyError, TypeError):
        return None
    flags = [opt for opt in getattr(param, "opts", ()) if opt.startswith("--")] or [str(param.name)]
    shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return f"{flags[0]} {shown!s} is not allowed; {reason[:1].lower()}{reason[1:]}"


def run() -> None:
    sys.exit(main())
