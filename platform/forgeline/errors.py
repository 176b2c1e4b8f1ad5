"""The root of every error Forgeline raises on purpose: :class:`ForgelineError`.

Each layer keeps its own error types (a workflow's located problems, a model URI that cannot be
resolved, a stage that failed, a gate that said no) and also derives them from this root, so a face
(the CLI, the REST API, a user's script) can catch one class and show the message -- written to be
read, naming the file, field and fix -- without a traceback, while a bug (any other exception) still
shows one. Operators derive theirs from it through ``forgeline.runtime.context.OperatorError``. A
leaf: it imports nothing, so every layer may import it.
"""

from __future__ import annotations

__all__ = ["ForgelineError"]


class ForgelineError(Exception):
    """An error the user can act on; ``str()`` is the whole message."""
