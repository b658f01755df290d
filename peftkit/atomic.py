"""Writes that never leave a half-written file or folder behind: a file is written under a temporary name and
renamed into place; a folder is filled under a temporary name and swapped in (``write_dir``), and a swap that a
crash interrupted is finished or undone the next time the folder is opened (``recover_dir``). New files follow the
process's umask. An output that cannot be written (full disk, read-only place) raises ``OutputError``, a clear
message for the CLI.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

import torch


class OutputError(OSError):
    """An output that cannot be written (full disk, read-only or missing folder); the message names the path."""


def output_error(err: OSError, path: str | os.PathLike) -> OutputError:
    """``err`` restated as a one-line message naming the path and what to do."""
    if isinstance(err, OutputError):
        return err
    where = err.filename or path
    reason = err.strerror or str(err)
    return OutputError(err.errno, f"cannot write {str(where)!r}: {reason}. Nothing was left half-written; free disk "
                                  "space, or choose a writable output folder, and run again")


def _new_name(path: Path, kind: str) -> Path:
    # pid first so that recovery can tell a dead writer's leftovers from a live one's
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see a partial file.

    The file gets the ordinary mode (0666 less the umask), like any file the user creates."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_name(path, "tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # not mkstemp: that forces 0600
        mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask
        write(str(tmp))
        os.chmod(tmp, mode)  # a writer may have replaced the file (safetensors creates it 0600)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(err, OSError):
            raise output_error(err, path) from None
        raise
    _fsync_dir(path.parent)


def write_dir(directory: Path, fill: Callable[[Path], None], keep_others: bool = False) -> None:
    """Write a folder whole: ``fill`` writes into a fresh hidden sibling, which is then swapped in for the old
    folder (old renamed aside, new renamed into place, old removed). A crash at any point leaves either the
    old or the new complete folder once ``recover_dir`` has run (every writer and reader of run folders calls it).

    ``keep_others``: entries of the old folder that ``fill`` does not write (e.g. other adapters' sub-folders)
    are carried into the new one as hard links (copies where links are impossible)."""
    directory = Path(directory)
    recover_dir(directory)
    tmp = _new_name(directory, "tmp")
    aside = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        fill(tmp)
        if keep_others and directory.is_dir():
            _carry_over(directory, tmp)
        _fsync_tree(tmp)  # copied files too: the new folder is on disk before it replaces the old one
        if directory.exists():
            aside = _new_name(directory, "old")
            os.replace(directory, aside)
        os.replace(tmp, directory)
    except BaseException as err:
        if aside is not None and not directory.exists():
            with contextlib.suppress(OSError):
                os.replace(aside, directory)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise output_error(err, directory) from None
        raise
    _fsync_dir(directory.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _carry_over(old: Path, new: Path) -> None:
    for entry in old.iterdir():
        if entry.name.startswith(".") or (new / entry.name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def recover_dir(directory: Path) -> None:
    """Finish or undo a folder swap that a crash interrupted: bring the old folder back if the new one never
    arrived, drop an old folder left beside the new one, and drop dead writers' temporary folders."""
    directory = Path(directory)
    parent = directory.parent
    if not parent.is_dir():
        return
    leftovers = [p for p in parent.glob(f".{glob.escape(directory.name)}.*-*") if p.is_dir()]
    for path in sorted(leftovers):
        kind, _, rest = path.name[len(directory.name) + 2:].partition("-")
        if kind == "old":
            if not directory.exists():
                os.replace(path, directory)
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif kind == "del" or (kind == "tmp" and not _alive(rest.split("-")[0])):
            shutil.rmtree(path, ignore_errors=True)


def remove_dir(directory: Path) -> None:
    """Delete a folder so that no reader ever sees it half-deleted: rename it aside first."""
    directory = Path(directory)
    if directory.exists():
        gone = _new_name(directory, "del")
        os.replace(directory, gone)
        shutil.rmtree(gone, ignore_errors=True)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # our own leftover from an earlier, failed attempt
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # contiguous, unaliased CPU copies (safetensors refuses shared storage)
    plain = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(plain, tmp, metadata={"format": "pt", **(metadata or {})})
        except Exception as err:  # safetensors reports a failed write as SafetensorError "... (os error N)"
            found = re.search(r"os error (\d+)", str(err))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None

    atomic_write(path, write)
