"""How the storage core's public operations are wrapped: the lock they take
and the errors they map. Shared by :mod:`dmsnap.storage.manager` and the
modules beside it; it imports none of them.

``@locked`` takes the control lock, ``@user_errors`` maps the catalog's,
naming and journal errors to :class:`dmsnap.errors.UserError` (they carry
clear text already), ``@locked_user_errors`` does both: a control operation.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from dmsnap import errors as E
from dmsnap.journal.journal import JournalError
from dmsnap.storage import names
from dmsnap.storage.catalog import Exists as CatExists
from dmsnap.storage.catalog import NotFound as CatNotFound

Json = dict[str, Any]

_F = TypeVar("_F", bound=Callable[..., Any])


class HasLock(Protocol):
    lock: threading.RLock


def journal_error(e: JournalError) -> E.UserError:
    """A journal's error as the user sees it."""
    if e.errno in (errno.EINVAL, errno.ERANGE):
        return E.InvalidArgument(str(e))
    if e.errno == errno.ENXIO:
        return E.NotFound(str(e))
    if e.errno == errno.ENOSPC:
        return E.NoSpace(str(e))
    return E.Unavailable(str(e))


def user_errors(fn: _F) -> _F:
    """Map catalog, naming and journal errors to UserError (no lock)."""

    def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except CatNotFound as e:
            raise E.NotFound(str(e)) from None
        except CatExists as e:
            raise E.AlreadyExists(str(e)) from None
        except names.BadName as e:
            raise E.InvalidArgument(str(e)) from None
        except JournalError as e:
            raise journal_error(e) from None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return cast(_F, wrapper)


def locked(fn: _F) -> _F:
    """Under the object's control lock (the daemon's own calls: assemble,
    health, teardown), errors as they are."""

    def wrapper(self: HasLock, *a: Any, **kw: Any) -> Any:
        with self.lock:
            return fn(self, *a, **kw)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return cast(_F, wrapper)


def locked_user_errors(fn: _F) -> _F:
    """A control operation: under the control lock, user errors mapped."""
    return locked(user_errors(fn))
