"""Whether a file the service writes could be created, asked without creating anything."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_reason(path: Path) -> str | None:
    """Why `path` could not be created or appended to by this process, or None; creates nothing.

    `check` may run as another user than the service (an administrator before the first start):
    folders it created would belong to that user, and the service could not write there.
    """
    if path.exists():
        if path.is_dir():
            return "es una carpeta"
        return None if os.access(path, os.W_OK) else "sin permiso de escritura"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"'{folder}' no es una carpeta"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"sin permiso de escritura en '{folder}'"
    return None
