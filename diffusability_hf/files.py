"""File permissions for atomic writes: a temporary file renamed into place must end up as a plain write leaves it.

``tempfile.mkstemp`` creates files with mode 0600 whatever the umask, so a file written through one and renamed
would be unreadable to the other users of a shared folder. This module imports nothing of the toolkit.
"""

import os


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_plain_write(path: str) -> None:
    """Give ``path`` the mode ``open(path, "w")`` would have given it: ``0o666`` less the umask."""
    os.chmod(path, 0o666 & ~umask())
