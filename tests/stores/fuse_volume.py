"""A real FUSE mount for the store tests: a passthrough of a backing directory whose ``rename`` either answers
ENOSYS (as a Unity Catalog volume's FUSE mount did in delta-io/delta-rs#2540) or is a copy then a delete of the file
(as blob FUSE layers do), with a pause per file like an object store's round trip.

Run: ``python -m tests.stores.fuse_volume BACKING MOUNTPOINT {enosys|copy}`` (foreground; unmount with
``fusermount3 -u MOUNTPOINT``).  pyarrow's C++ calls ``rename`` beneath Python, so only a real mount tests it.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time

import mfusepy as fuse

COPY_PAUSE_S = 0.01  # per file copied by a "rename": an object store's round trip, kept small for CI


class Passthrough(fuse.Operations):
    use_ns = True

    def __init__(self, root: str, rename_mode: str):
        self.root, self.rename_mode = os.path.realpath(root), rename_mode

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def access(self, path, amode):
        if not os.access(self._path(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self._path(path), uid, gid)
        return 0

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        return {key: getattr(st, key) for key in ("st_atime_ns", "st_ctime_ns", "st_gid", "st_mode", "st_mtime_ns",
                                                   "st_nlink", "st_size", "st_uid")} | {
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)
        return 0

    def rmdir(self, path):
        os.rmdir(self._path(path))
        return 0

    def unlink(self, path):
        os.unlink(self._path(path))
        return 0

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        return {key: getattr(st, key) for key in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                   "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def utimens(self, path, times=None):
        os.utime(self._path(path), ns=times)
        return 0

    def rename(self, old, new):
        if self.rename_mode == "enosys":
            raise fuse.FuseOSError(errno.ENOSYS)
        src, dst = self._path(old), self._path(new)
        if os.path.isdir(src):  # copy every file, then delete: what a blob FUSE layer does
            for base, _, names in os.walk(src):
                os.makedirs(os.path.join(dst, os.path.relpath(base, src)), exist_ok=True)
                for name in names:
                    time.sleep(COPY_PAUSE_S)
                    shutil.copyfile(os.path.join(base, name), os.path.join(dst, os.path.relpath(base, src), name))
            shutil.rmtree(src)
        else:
            time.sleep(COPY_PAUSE_S)
            shutil.copyfile(src, dst)
            os.unlink(src)
        return 0

    def open(self, path, flags):
        return os.open(self._path(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path), length)
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        return 0


def main(argv: list[str]) -> None:
    backing, mountpoint, mode = argv
    fuse.FUSE(Passthrough(backing, mode), mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    main(sys.argv[1:])
