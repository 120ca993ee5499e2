"""The one base of jaxtune's user-facing errors.

A :class:`JaxtuneError` is an error the user can fix: its message names the file, line or config
key at fault and says what to do. Every such error class in jaxtune derives from it (keeping its
historical built-in base too, e.g. ``DataError(JaxtuneError, ValueError)``, so existing
``except ValueError`` code keeps working), and each command-line entry point catches
``JaxtuneError`` in one place, prints its message (no traceback) and exits with status 2. Anything
else escaping a CLI is a bug in jaxtune and keeps its traceback.
"""

import sys

INSTALL_COMMAND = "pip install -e .  (in the jaxtune checkout: installs every dependency of jaxtune)"


class JaxtuneError(Exception):
    """An error the user can fix; the message names the file/line/key and the fix."""


class MissingPackageError(JaxtuneError, ImportError):
    """A package is not installed: the message names it, what needs it and the command that installs it.

    Raised where jaxtune meets the ImportError, so that an environment problem is never reported as
    a problem of the user's data, config or model.
    """

    def __init__(self, package: str, needed_for: str, *, declared: bool = True, cause: BaseException | None = None):
        install = (f"install jaxtune's dependencies: {INSTALL_COMMAND}, or just this one: pip install {package}"
                   if declared else f"it is optional, not installed with jaxtune: pip install {package}")
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        super().__init__(f"the Python package {package!r} is not installed in this environment "
                         f"({sys.executable}); {needed_for} needs it{detail}. To fix, {install}", name=package)
        self.package = package
