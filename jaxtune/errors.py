"""The one base of jaxtune's user-facing errors.

A :class:`JaxtuneError` is an error the user can fix: its message names the file, line or config
key at fault and says what to do. Every such error class in jaxtune derives from it (keeping its
historical built-in base too, e.g. ``DataError(JaxtuneError, ValueError)``, so existing
``except ValueError`` code keeps working), and each command-line entry point catches
``JaxtuneError`` in one place, prints its message (no traceback) and exits with status 2. Anything
else escaping a CLI is a bug in jaxtune and keeps its traceback.
"""


class JaxtuneError(Exception):
    """An error the user can fix; the message names the file/line/key and the fix."""
