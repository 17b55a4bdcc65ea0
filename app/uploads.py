"""Safe extraction of an uploaded training data set: a zip holding one JSONL file plus its images.

Refused with a clear message (RALError): files over the size limit, anything that is not a zip, encrypted
members, absolute paths, `..` components, links and other non-regular members, too many members, and zip
bombs (the total uncompressed size is capped: the declared sizes first, then the bytes really written).
After extraction the JSONL is checked by `ral_core.data.jsonl.JsonlDataset` (its messages name the line) and
every image it names must lie inside the extracted folder and open as an image.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from ral_core import settings
from ral_core.errors import RALError

_NOT_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
NOT_UPLOADED = "the file must be uploaded through the page (or be one of the examples); upload it again"

MAX_ZIP_BYTES = int(settings.get("RAL_MAX_UPLOAD_MB") * 1024 * 1024)
MAX_UNZIPPED_BYTES = 4 * MAX_ZIP_BYTES  # read at call time, so a server (or a test) can change them
MAX_MEMBERS = 20_000
CHUNK = 1 << 16


def _mb(n: int) -> str:
    mb = n / 1024 / 1024
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.2g} MB"


def _safe_member(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's relative path, None for folders; RALError for anything unsafe."""
    name = info.filename
    if info.flag_bits & 0x1:
        raise RALError(f"the zip member '{name}' is encrypted; upload an unencrypted zip")
    mode = info.external_attr >> 16
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise RALError(f"the zip member '{name}' is a link or special file; only plain files are accepted")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or "\x00" in norm:
        raise RALError(f"the zip member '{name}' has an absolute path; paths must be relative")
    parts = PurePosixPath(norm).parts
    if any(p == ".." for p in parts):
        raise RALError(f"the zip member '{name}' points outside the folder ('..'); refused")
    if info.is_dir() or norm.endswith("/"):
        return None
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise RALError(f"the zip member '{name}' has an empty name")
    return PurePosixPath(*parts)


def _check_size(zp: Path, limit: int, shown_name: str) -> None:
    try:
        size = zp.stat().st_size
    except OSError:
        raise RALError("the upload did not arrive; upload the zip again") from None
    if size > limit:
        raise RALError(f"{shown_name} is {_mb(size)}, over the {_mb(limit)} limit; upload a smaller zip")


def _open_zip(zp: Path, shown_name: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(zp)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise RALError(f"{shown_name} is not a valid zip file; zip the JSONL file and its images") from None


def _plan(infos, max_members: int, max_unzipped_bytes: int, shown_name: str) -> tuple[list, int]:
    """Every member with its safe relative path (None for a folder), and the declared unpacked bytes: all names and
    the bounds checked before anything is written."""
    if len(infos) > max_members:
        raise RALError(f"{shown_name} holds {len(infos)} files, over the limit of {max_members}")
    plan = [(i, _safe_member(i)) for i in infos]
    declared = sum(i.file_size for i, rel in plan if rel is not None)
    if declared > max_unzipped_bytes:
        raise RALError(f"{shown_name} unpacks to {_mb(declared)}, over the {_mb(max_unzipped_bytes)} limit "
                       "(zip-bomb guard)")
    return plan, declared


def check_zip(zip_path, shown_name: str = "the upload") -> int:
    """The checks that need no unpacking (size, a zip, safe member names, the declared unpacked size); returns the
    declared unpacked bytes. A queued run is checked so when it is queued and unpacked only when it starts."""
    zp = Path(zip_path)
    _check_size(zp, MAX_ZIP_BYTES, shown_name)
    with _open_zip(zp, shown_name) as zf:
        return _plan(zf.infolist(), MAX_MEMBERS, MAX_UNZIPPED_BYTES, shown_name)[1]


def extract_zip(zip_path, dest, max_zip_bytes: int | None = None, max_unzipped_bytes: int | None = None,
                max_members: int | None = None, shown_name: str = "the upload") -> Path:
    """Extract `zip_path` into the fresh folder `dest` (created); returns it. Nothing is left on failure."""
    max_zip_bytes = max_zip_bytes or MAX_ZIP_BYTES
    max_unzipped_bytes = max_unzipped_bytes or MAX_UNZIPPED_BYTES
    max_members = max_members or MAX_MEMBERS
    zp = Path(zip_path)
    _check_size(zp, max_zip_bytes, shown_name)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    try:
        with _open_zip(zp, shown_name) as zf:
            plan = _plan(zf.infolist(), max_members, max_unzipped_bytes, shown_name)[0]
            total, base = 0, dest.resolve()
            for info, rel in plan:
                if rel is None:
                    continue
                target = (dest / rel)
                if not target.resolve().is_relative_to(base):
                    raise RALError(f"the zip member '{info.filename}' points outside the folder; refused")
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "xb") as out:
                        while chunk := src.read(CHUNK):
                            total += len(chunk)
                            if total > max_unzipped_bytes:  # headers can lie: count what really comes out
                                raise RALError(f"{shown_name} unpacks to more than {_mb(max_unzipped_bytes)} "
                                               "(zip-bomb guard)")
                            out.write(chunk)
                except FileExistsError:
                    raise RALError(f"{shown_name} holds '{rel}' twice; each file may appear once") from None
                except (zipfile.BadZipFile, EOFError, NotImplementedError, OSError, ValueError) as e:
                    why = str(e) if isinstance(e, (zipfile.BadZipFile, NotImplementedError)) else type(e).__name__
                    raise RALError(f"{shown_name} is damaged: cannot unpack '{info.filename}' ({why})") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def find_jsonl(folder: Path, shown_name: str = "the upload") -> Path:
    """The one .jsonl file in the extracted folder (train.jsonl wins when there are several)."""
    found = sorted(p for p in Path(folder).rglob("*.jsonl") if p.is_file() and "__MACOSX" not in p.parts)
    if not found:
        raise RALError(f"{shown_name} holds no .jsonl file; add one line per sample: "
                       '{"image": "img/1.png", "question": "…", "answer": "…"}')
    if len(found) > 1:
        named = [p for p in found if p.name == "train.jsonl"]
        if len(named) != 1:
            rels = ", ".join(str(p.relative_to(folder)) for p in found[:5])
            raise RALError(f"{shown_name} holds several .jsonl files ({rels}); keep one, or name the one to use "
                           "train.jsonl")
        return named[0]
    return found[0]


def dataset_from_zip(zip_path, dest, shown_name: str = "the upload") -> tuple[Path, int]:
    """Extract, find and validate the JSONL (every row, every image's header); returns (jsonl path, number of
    samples)."""
    from ral_core.data.jsonl import JsonlDataset

    folder = extract_zip(zip_path, dest, shown_name=shown_name)
    try:
        path = find_jsonl(folder, shown_name)
        ds = JsonlDataset(path, check_images=False)  # containment first, then existence (no path leaks)
        base = folder.resolve()
        for r in ds.rows:
            if not Path(r["image_path"]).resolve().is_relative_to(base):
                raise RALError(f"{path.name} line {r['line']}: the image path must point to a file inside the zip")
        ds.check_image_files()  # all rows, not a sample: a bad row found later in training would name this folder
    except RALError as e:
        shutil.rmtree(folder, ignore_errors=True)
        base = str(folder.resolve())  # messages name files inside the zip, never the server's folder
        raise RALError(str(e).replace(base + os.sep, "").replace(base, "the zip")) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path, len(ds)


def upload_root() -> Path:
    """Where Gradio stores what browsers upload (read at call time: GRADIO_TEMP_DIR may change)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def accepted_path(value, extra_files=(), nothing: str = "no file: upload one") -> tuple[Path, str]:
    """A file value from a request → (server path, name to show), only for what Gradio uploaded or a bundled file.

    With preprocess=False the value arrives as the client sent it, so its `path` is untrusted: anything outside
    Gradio's upload folder (and not one of `extra_files`) gets one message, the same whether the path exists,
    is a folder or is missing, so a client learns nothing about the server's files.
    """
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or value == "":
        raise RALError(nothing)
    if isinstance(value, dict):
        path, name = value.get("path"), value.get("orig_name")
    elif isinstance(value, (str, os.PathLike)):
        path, name = value, None
    else:
        raise RALError(NOT_UPLOADED)
    if not isinstance(path, (str, os.PathLike)) or not str(path) or "\x00" in str(path):
        raise RALError(NOT_UPLOADED)
    try:
        p = Path(path).resolve()
        allowed = {Path(f).resolve() for f in extra_files}
        ok = (p in allowed or (p.is_relative_to(upload_root()) and p != upload_root())) and p.is_file()
    except (OSError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise RALError(NOT_UPLOADED)
    shown = name if isinstance(name, str) and name.strip() else p.name
    shown = _NOT_TEXT.sub("?", PurePosixPath(shown.replace("\\", "/")).name[:120])  # echoed in messages: text only
    return p, shown or "the uploaded file"
