"""Writing files so that a crash never leaves one half-written."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Union


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    A crash or an error leaves ``path`` as it was (absent or the previous file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
