"""The exit-code contract every command shares, and the errors that carry it.

Operations raise these; only the CLI turns them into exit codes and messages,
so the same failure means the same code whichever command met it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug in imagetool, never the answer to bad input
    USAGE = 2  # the command line is wrong
    REJECTED = 3  # the image is unsafe, unsupported or corrupt
    SIZE_LIMIT = 4  # a size limit is exceeded
    ENVIRONMENT = 5  # I/O or environment: missing file, permissions, disk full, no qemu-img


# Reason codes that mean "too big" rather than "bad": they map to exit 4.
SIZE_REASONS = frozenset({"too_large", "compressed_too_large", "does_not_fit"})


@dataclass(frozen=True)
class Reason:
    """One named, stable reason an image was rejected (or warned about)."""

    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def exit_code_for(reasons: list[Reason]) -> ExitCode:
    """Size-only rejections exit 4; anything else that is wrong with the image exits 3."""
    if not reasons:
        return ExitCode.OK
    if all(r.code in SIZE_REASONS for r in reasons):
        return ExitCode.SIZE_LIMIT
    return ExitCode.REJECTED


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C (KeyboardInterrupt) so cleanups run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class ImagetoolError(Exception):
    """A failure with a one-line message, a stable code and an exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL
    code: str = "internal"

    def __init__(self, message: str, *, path: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        if code is not None:
            self.code = code

    def one_line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}{self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "path": self.path}


class UsageProblem(ImagetoolError):
    exit_code = ExitCode.USAGE
    code = "usage"


class EnvironmentProblem(ImagetoolError):
    """Missing files, permissions, disk full, qemu-img absent: not the image's fault."""

    exit_code = ExitCode.ENVIRONMENT
    code = "environment"


class ImageRejected(ImagetoolError):
    """The image failed a safety or policy check; `reasons` says which."""

    def __init__(
        self, message: str, reasons: list[Reason], *, path: str | None = None, report: object | None = None
    ) -> None:
        super().__init__(message, path=path, code=reasons[0].code if reasons else "rejected")
        self.reasons = reasons
        self.report = report
        self.exit_code = exit_code_for(reasons)

    def as_dict(self) -> dict[str, object]:
        out = super().as_dict()
        out["reasons"] = [r.as_dict() for r in self.reasons]
        return out


class SizeLimitExceeded(ImagetoolError):
    exit_code = ExitCode.SIZE_LIMIT
    code = "compressed_too_large"


class VerifyFailed(ImagetoolError):
    """The written output is not what it should be (unclean, or not the input's content): removed."""

    exit_code = ExitCode.ENVIRONMENT
    code = "verify_failed"
