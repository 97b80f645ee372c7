"""The one base class of every error a user can fix.

The ``rlhf`` command shows a :class:`UserError` as one message without a traceback
(``RLHF_DEBUG=1`` shows the traceback). A plugin raises one (or a subclass: ``StageError``,
``ComponentError`` ...) for a problem its user should fix rather than report.
"""
from __future__ import annotations


#: The supported plugin API of this module (see docs/reference/api.md).
__all__ = ["UserError"]


class UserError(Exception):
    """A problem the user can fix; its message says what, where, and what is accepted."""
