"""What :mod:`dmsnap.storage.manager` and :mod:`dmsnap.storage.exports` share.

A module of its own because manager.py imports exports.py (the Manager
inherits its export methods): exports.py cannot import manager.py back.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from dmsnap import errors as E
from dmsnap.journal.journal import JournalError
from dmsnap.storage import names
from dmsnap.storage.catalog import Exists as CatExists
from dmsnap.storage.catalog import NotFound as CatNotFound

if TYPE_CHECKING:  # for the annotation only: importing it at run time would be a cycle
    from dmsnap.storage.manager import Manager

Json = dict[str, Any]

_F = TypeVar("_F", bound=Callable[..., Any])


def _journal_error(e: JournalError) -> E.UserError:
    if e.errno in (errno.EINVAL, errno.ERANGE):
        return E.InvalidArgument(str(e))
    if e.errno == errno.ENXIO:
        return E.NotFound(str(e))
    if e.errno == errno.ENOSPC:
        return E.NoSpace(str(e))
    return E.Unavailable(str(e))


def _errors_to_user(fn: _F) -> _F:
    """Map catalog, naming and journal errors to UserError; they carry clear text already."""

    def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except CatNotFound as e:
            raise E.NotFound(str(e)) from None
        except CatExists as e:
            raise E.AlreadyExists(str(e)) from None
        except names.NameError_ as e:
            raise E.InvalidArgument(str(e)) from None
        except JournalError as e:
            raise _journal_error(e) from None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return cast(_F, wrapper)


def _locked(fn: _F) -> _F:
    """Under the Manager's control lock (the daemon's own calls: assemble,
    health, teardown), errors as they are."""

    def wrapper(self: Manager, *a: Any, **kw: Any) -> Any:
        with self.lock:
            return fn(self, *a, **kw)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return cast(_F, wrapper)


def _user_errors(fn: _F) -> _F:
    """A control operation: under the Manager's lock, user errors mapped."""
    return _locked(_errors_to_user(fn))
