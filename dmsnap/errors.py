"""Errors a user can cause. Each carries a stable ``code`` for the control
protocol and ``--json``, and a message that is one clear line. Raising one
means nothing was changed."""

from __future__ import annotations


class UserError(Exception):
    code = "error"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(UserError):
    code = "invalid"
    exit_code = 2


class NotFound(UserError):
    code = "not_found"
    exit_code = 3


class AlreadyExists(UserError):
    code = "exists"
    exit_code = 4


class Busy(UserError):
    code = "busy"
    exit_code = 5


class NoSpace(UserError):
    code = "no_space"
    exit_code = 6


class Unavailable(UserError):
    """The daemon is not running / not reachable, or the kernel lacks a feature."""

    code = "unavailable"
    exit_code = 7


class PermissionDenied(UserError):
    code = "denied"
    exit_code = 13


BY_CODE: dict[str, type[UserError]] = {
    c.code: c
    for c in (
        UserError,
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Busy,
        NoSpace,
        Unavailable,
        PermissionDenied,
    )
}
