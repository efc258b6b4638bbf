"""
Atomic writes: every file or directory this project writes appears complete or not at all (a run killed
mid-write leaves the previous version), with the modes the user's umask gives, flushed before the rename.
  write_file(path, write_fn)   write_fn(tmp_path) writes one file; it replaces `path`
  write_text(path, text)       the same for a string
  write_dir(path, write_fn)    write_fn(tmp_dir) fills a directory; it replaces `path`
"""
import os
import shutil
import tempfile


def write_file(path, write_fn):
    """Run write_fn(tmp) on a temp name beside `path`, then flush it and rename it over `path`."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())       # mkstemp's 0600 would hide results from colleagues
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_file(path, write)


def write_dir(path, write_fn):
    """Run write_fn(tmp_dir) on a fresh temp dir beside `path`, then swap it into place (swap_into_place)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    try:
        write_fn(tmp)
        swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp, path):
    """Flush the finished temp dir `tmp`, then rename it to `path` (the old `path`, if any, moved aside
    first and deleted after) and flush the parent so the rename itself survives a crash. Used directly
    where several processes fill one temp dir (checkpoint.save)."""
    parent = os.path.dirname(path)
    honour_umask(tmp)
    fsync_tree(tmp)
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(path)}-")
        os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    _fsync(parent)


def honour_umask(root):
    """mkdtemp makes 0700 dirs (and some writers 0600 files): give the tree the modes any file the user
    creates gets, so colleagues on a shared filesystem can read a checkpoint."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for d, dirs, files in os.walk(root):
        for n in dirs:
            os.chmod(os.path.join(d, n), 0o777 & ~umask)
        for n in files:
            os.chmod(os.path.join(d, n), 0o666 & ~umask)


def fsync_tree(root):
    """Flush every file under `root` and the directories themselves to disk: a rename is only as durable
    as what it names, and after a power cut a renamed directory of unflushed files is a corrupt checkpoint."""
    for d, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(os.path.join(d, name))
        _fsync(d)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
