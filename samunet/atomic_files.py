"""Writing small files so that a reader never sees half of one: write a temporary file in the same
folder, then ``os.replace`` it over the target (atomic on one file system); on failure the temporary
file is removed and the previous target, if any, stays as it was."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomically(path: str | os.PathLike, content, *, prefix: str = ".partial_") -> Path:
    """``json.dump(content)`` (indented) into ``path`` atomically; the temporary file starts with ``prefix``."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".json", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(content, stream, indent=2)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
