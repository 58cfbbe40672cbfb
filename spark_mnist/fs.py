"""Local file writes that never leave a half-written file under the final name.

:func:`replacing` is the one "write to a temporary name beside the target, then ``os.replace``" of the package:
IDX files, checkpoints, models, pictures and downloads all go through it.  ``os.replace`` is atomic on POSIX
(and on the ``/dbfs`` and ``/Volumes`` FUSE mounts, within one directory).  No Spark here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` in one rename, on any
    error it is removed and ``path`` is left as it was.

    Example::

        with replacing("run/model.pt") as tmp:
            torch.save(state, tmp)
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
