"""Where archives and exports live: a local folder or an S3 bucket prefix, behind one small interface.

A location is the value of ``PERF_PIPELINE_ARCHIVE_DIR`` / ``PERF_PIPELINE_EXPORT_DIR``: a folder (the
embedded default) or ``s3://bucket/prefix``. S3 goes through :mod:`pyarrow.fs` (``FileSystem.from_uri``,
no other client library), which follows the AWS conventions: credentials from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (else ``~/.aws``, a pod's web identity or the instance
role), region from ``AWS_REGION``, endpoint from ``AWS_ENDPOINT_URL`` (any S3-compatible server).

What a :class:`Store` guarantees, on disk and on S3 alike:

* **Complete or absent.** :meth:`Store.writer` makes an object visible under its final name only once it
  is complete. Local: an unnamed ``O_TMPFILE`` (or a hidden named temp) in the target folder, fsynced,
  linked/renamed into place, folder fsynced. S3: the bytes go to a temporary key under
  ``<prefix>/.tmp/`` as a multipart upload; only once that upload is complete is it copied server-side
  (``CopyObject``: the final key appears whole, or not at all) and the temporary key deleted. Uploading
  straight to the final key would not do: pyarrow completes a multipart upload whenever its stream is
  closed — also by a ``with`` block left by an exception, or by the garbage collector — and has no abort,
  so a failed write would leave a truncated object under the final name (seen against SeaweedFS). A
  writer killed mid-upload leaves an incomplete multipart upload (no object; the bucket's lifecycle rule
  ``AbortIncompleteMultipartUpload`` reclaims its parts); killed between the upload and the copy, a
  temporary object that the next writer of the same key deletes. ``CopyObject`` takes at most 5 GB on AWS
  S3: an object must stay below that (a 10M-row audit month is ~520 MB).
* **Facts from the store.** :meth:`Store.info` reads size, ETag and VersionId back from the store (an
  S3 HEAD: pyarrow's ``FileInfo`` has no ETag, but the metadata of an opened object carries the
  response's ``ETag``, ``Last-Modified`` and, on a versioned bucket, ``VersionId``). A local file has no
  ETag; its "ETag" is ``local:<mtime ns>:<inode>``, which any rewrite changes.
* **Bounded memory.** Writes go through a 1 MiB buffer; reads are ranged, a block at a time.
* **Clear errors.** :meth:`Store.check` (called before any data is touched) proves the location usable:
  the bucket exists and a small probe object can be written and deleted. Anything else raises
  :class:`StorageError` naming the setting; AWS secrets never appear in a message.

Callers serialize the writers of one key (the archive's and the exports' advisory locks): a writer
removes what earlier, killed writers of the same key left behind.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import logging
import os
import secrets
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from perf_pipeline.lib.redact import redact_text, redact_url
from perf_pipeline.settings import split_s3_url

log = logging.getLogger(__name__)

#: bytes gathered before one write to the file or the upload stream
WRITE_BUFFER_BYTES = 1 << 20
#: bytes per read when streaming an object (one ranged GET each on S3)
READ_BLOCK_BYTES = 8 << 20
#: folder under an S3 location that holds uploads not yet copied into place (lifecycle: expire after a day)
TMP_FOLDER = ".tmp"
#: the AWS variables pyarrow's S3 client reads (a change of any of them gives a new client)
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)
#: AWS variables whose values are secrets
AWS_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class StorageError(RuntimeError):
    """A storage location is unusable (bad URL, missing bucket, refused credentials, unwritable folder) or
    an object is not what it should be; the message names the setting and never holds a secret."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    etag: str | None  # S3 ETag without quotes; a local file: local:<mtime ns>:<inode>
    version_id: str | None = None  # S3 VersionId on a versioned bucket


def _secrets() -> tuple[str, ...]:
    return tuple(v for k in AWS_SECRET_VARIABLES if (v := os.environ.get(k)))


def describe_error(exc: BaseException) -> str:
    """The first line of ``exc``, AWS secrets and URL passwords masked."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return redact_text(first, _secrets())


# ------------------------------------------------------------------------------------------- writing


class HashingSink(io.RawIOBase):
    """Writes through a 1 MiB buffer of its own to ``write_all``, hashing (sha256) and counting what passes.

    The sink of GzipFile and pyarrow's ParquetWriter. It owns its buffer (rather than a BufferedWriter
    around the target) so that an abandoned write never flushes stale bytes later, from a garbage
    collector, into a descriptor or stream that may by then be something else.
    """

    def __init__(self, write_all: Callable[[memoryview], None]) -> None:
        super().__init__()
        self._write_all = write_all
        self._buffer = bytearray()
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self._buffer += view
        self.size += len(view)
        if len(self._buffer) >= WRITE_BUFFER_BYTES:
            self.flush()
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if self._buffer:
            with memoryview(self._buffer) as view:
                self._write_all(view)
            self._buffer.clear()

    def close(self) -> None:
        # GzipFile and pyarrow close their sink when done; the target stays open for the commit
        if not self.closed:
            self.flush()
        super().close()

    def abort(self) -> None:
        """Drop unwritten bytes and close without writing (also makes a later close a no-op)."""
        self._buffer.clear()
        super().close()


class AtomicWriter(ABC):
    """One object being written: bytes go to :attr:`sink`; :meth:`commit` puts it in place whole,
    :meth:`discard` leaves no trace of it. As a context manager: commit on a clean exit, discard on an
    exception."""

    sink: HashingSink
    info: ObjectInfo | None = None

    @property
    def size(self) -> int:
        return self.sink.size

    @property
    def sha256(self) -> str:
        return self.sink.sha256.hexdigest()

    @abstractmethod
    def commit(self) -> ObjectInfo: ...

    @abstractmethod
    def discard(self) -> None: ...

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.discard()
        elif self.info is None:
            self.commit()


# ---------------------------------------------------------------------------------------------- stores


class Store(ABC):
    """A location (folder or bucket prefix) holding objects named by relative keys (``a/b.parquet``)."""

    def __init__(self, setting: str) -> None:
        self.setting = setting

    @property
    @abstractmethod
    def root_uri(self) -> str:
        """The location as configured (a folder path or s3://bucket/prefix)."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """Where ``key`` is: a local absolute path, or ``s3://bucket/prefix/key`` (what the manifest records)."""

    @abstractmethod
    def check(self) -> None:
        """Prove the location usable before any data is touched: creates a local folder if needed, checks an
        S3 bucket exists, writes a small probe object the way every object is written (S3: upload, copy into
        place, list and delete) and deletes it. Raises :class:`StorageError`. Cost: a few small requests (S3,
        ~8) or file operations."""

    @abstractmethod
    def writer(self, key: str, *, temp_tag: str | None = None) -> AtomicWriter:
        """An :class:`AtomicWriter` for ``key`` (replacing an older object when committed). ``temp_tag``:
        prefix of its temporary names (default ``.<name>``), whose leftovers from killed writers of the
        same key are removed first (callers serialize writers of one key)."""

    @abstractmethod
    def info(self, key: str) -> ObjectInfo | None:
        """Size, ETag and version of ``key`` as the store has it now, or None if absent (one HEAD / stat)."""

    @abstractmethod
    def open_input(self, key: str) -> pa.NativeFile:
        """A random-access file over ``key`` (ranged reads on S3; what Parquet readers need).
        ``FileNotFoundError`` if absent."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""

    @abstractmethod
    def walk(self, folder: str = "") -> list[str]:
        """Keys of every object under ``folder`` (recursively, temporary ones included), sorted."""

    @abstractmethod
    def sweep_temps(self, key: str, temp_tag: str | None = None) -> list[str]:
        """Delete the temporary objects killed writers of ``key`` left; returns what was removed."""

    def iter_blocks(self, key: str, block_bytes: int = READ_BLOCK_BYTES) -> Iterator[bytes]:
        """The object's bytes, ``block_bytes`` at a time (memory: one block)."""
        with self.open_input(key) as f:
            while block := f.read(block_bytes):
                yield block

    def sha256(self, key: str) -> tuple[int, str]:
        """(size, sha256) of ``key`` as read back from the store now. Cost: one full sequential read."""
        digest, size = hashlib.sha256(), 0
        for block in self.iter_blocks(key):
            digest.update(block)
            size += len(block)
        return size, digest.hexdigest()

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_blocks(key))

    def write_bytes(self, key: str, data: bytes) -> ObjectInfo:
        with self.writer(key) as w:
            w.sink.write(data)
        assert w.info is not None
        return w.info

    def describe(self) -> str:
        """The location for messages (no secrets)."""
        return redact_url(self.root_uri) or self.root_uri

    def error(self, what: str, exc: BaseException | None = None) -> StorageError:
        detail = f": {describe_error(exc)}" if exc is not None else ""
        return StorageError(f"{self.setting} ({self.describe()}): {what}{detail}")


def _split_key(key: str) -> tuple[str, str]:
    folder, _, name = key.strip("/").rpartition("/")
    if not name or any(part in ("", ".", "..") for part in key.strip("/").split("/")):
        raise ValueError(f"not an object key: {key!r}")
    return folder, name


def _temp_tag(name: str, temp_tag: str | None) -> str:
    return temp_tag if temp_tag is not None else f".{name}"


# ------------------------------------------------------------------------------------------ local disk


def make_dirs_durable(folder: Path) -> None:
    """``mkdir -p folder``, fsyncing the parent of every directory it creates: a new folder whose own entry
    is not durable could vanish in a crash together with the file renamed into it."""
    missing = []
    cur = folder
    while not cur.exists():
        missing.append(cur)
        cur = cur.parent
    folder.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        _fsync_dir(created.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_fd(fd: int) -> Callable[[memoryview], None]:
    def write_all(view: memoryview) -> None:
        while view:
            view = view[os.write(fd, view) :]

    return write_all


class _LocalWriter(AtomicWriter):
    """Prefers ``O_TMPFILE`` (an unnamed inode: nothing to clean after SIGKILL), else a hidden named
    ``<tag>-<random>.part`` next to the target, which the next writer of the same key removes."""

    def __init__(self, store: LocalStore, key: str, temp_tag: str | None) -> None:
        folder_key, name = _split_key(key)
        self.store = store
        self.final = store.root / key
        self.folder = self.final.parent
        self.tag = _temp_tag(name, temp_tag)
        self.part: Path | None = None
        make_dirs_durable(self.folder)
        store.sweep_temps(key, temp_tag)
        self._token = f"{self.tag}-{secrets.token_hex(4)}"
        try:
            self.fd = os.open(self.folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o640)
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self.part = self.folder / f"{self._token}.part"
            self.fd = os.open(self.part, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o640)
        self.sink = HashingSink(_write_fd(self.fd))

    def commit(self) -> ObjectInfo:
        """fsync the data, put it in place atomically (replacing an older file), fsync the folder."""
        self.sink.close()
        os.fsync(self.fd)
        dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self.part is None:
                staged = self.folder / f"{self._token}.link"
                # linkat(AT_SYMLINK_FOLLOW) gives the unnamed inode a (hidden) name; passing dst_dir_fd
                # makes Python call linkat rather than link(), which would not follow /proc's symlink
                os.link(f"/proc/self/fd/{self.fd}", staged.name, dst_dir_fd=dir_fd, follow_symlinks=True)
            else:
                staged = self.part
            os.replace(staged, self.final)  # atomic, replaces the file of an earlier attempt
            self.part = None
            os.close(self.fd)
            self.fd = -1
            os.fsync(dir_fd)  # make the new name itself durable
        finally:
            os.close(dir_fd)
        info = self.store.info_of(self.final)
        assert info is not None
        self.info = info
        return info

    def discard(self) -> None:
        self.sink.abort()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.part is not None:
            self.part.unlink(missing_ok=True)
            self.part = None


class LocalStore(Store):
    """A folder on this machine's disks (the embedded default)."""

    def __init__(self, root: str | os.PathLike[str], setting: str = "PERF_PIPELINE_ARCHIVE_DIR") -> None:
        super().__init__(setting)
        self.root = Path(root).expanduser().absolute()
        self.fs = pafs.LocalFileSystem()

    @property
    def root_uri(self) -> str:
        return str(self.root)

    def uri(self, key: str) -> str:
        _split_key(key)
        return str(self.root / key)

    def check(self) -> None:
        try:
            make_dirs_durable(self.root)
            probe = self.root / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, b"probe")
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as exc:
            raise self.error("cannot create or write files in this folder", exc) from exc

    def writer(self, key: str, *, temp_tag: str | None = None) -> AtomicWriter:
        return _LocalWriter(self, key, temp_tag)

    @staticmethod
    def info_of(path: Path) -> ObjectInfo | None:
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        return ObjectInfo(str(path), st.st_size, f"local:{st.st_mtime_ns}:{st.st_ino}")

    def info(self, key: str) -> ObjectInfo | None:
        return self.info_of(self.root / key)

    def open_input(self, key: str) -> pa.NativeFile:
        return self.fs.open_input_file(str(self.root / key))

    def delete(self, key: str) -> bool:
        try:
            (self.root / key).unlink()
        except FileNotFoundError:
            return False
        return True

    def walk(self, folder: str = "") -> list[str]:
        base = self.root / folder if folder else self.root
        out = []
        for dirpath, _, files in os.walk(base):
            out += [str((Path(dirpath) / f).relative_to(self.root)) for f in files]
        return sorted(out)

    def sweep_temps(self, key: str, temp_tag: str | None = None) -> list[str]:
        folder_key, name = _split_key(key)
        folder = self.root / folder_key if folder_key else self.root
        tag = _temp_tag(name, temp_tag)
        removed = []
        if folder.is_dir():
            for path in folder.glob(f"{tag}-*"):
                if path.suffix in (".part", ".link"):
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        legacy = folder / f".{name}.tmp"  # the archive's temp name before this module
        if legacy.exists() or legacy.is_symlink():
            legacy.unlink()  # a folder in its way raises: the write cannot be made safely
            removed.append(legacy.name)
        return removed


# ------------------------------------------------------------------------------------------------ S3


@functools.lru_cache(maxsize=32)
def _s3_filesystem(bucket: str, environment: tuple[tuple[str, str | None], ...]) -> pafs.S3FileSystem:
    # one client per bucket and AWS environment: FileSystem.from_uri reads AWS_ENDPOINT_URL (the plain
    # S3FileSystem() constructor does not), credentials and region as the AWS SDK does
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
    assert isinstance(fs, pafs.S3FileSystem)
    return fs


def s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    return _s3_filesystem(bucket, tuple((k, os.environ.get(k)) for k in AWS_VARIABLES))


def _header(metadata: Any, name: str) -> bytes | None:
    """A response header from an opened object's metadata (pyarrow's KeyValueMetadata, str keys)."""
    for key in (name, name.encode()):
        with contextlib.suppress(KeyError, TypeError):
            value = metadata[key]
            if value:
                return value if isinstance(value, bytes) else str(value).encode()
    return None


_REFUSED = ("ACCESS_DENIED", "AccessDenied", "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId", "Forbidden")


def _endpoint() -> str:
    return redact_url(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")) or "AWS S3"


class _S3Writer(AtomicWriter):
    """Uploads to ``<prefix>/.tmp/<folder>/<tag>-<random>.part``, then copies to the final key."""

    def __init__(self, store: S3Store, key: str, temp_tag: str | None) -> None:
        folder_key, name = _split_key(key)
        self.store = store
        self.key = key
        tag = _temp_tag(name, temp_tag)
        store.sweep_temps(key, temp_tag)
        temp_folder = "/".join(p for p in (TMP_FOLDER, folder_key) if p)
        self.temp_key = f"{temp_folder}/{tag}-{secrets.token_hex(4)}.part"
        self.stream = store.fs.open_output_stream(store.path(self.temp_key))
        self.sink = HashingSink(self.stream.write)

    def commit(self) -> ObjectInfo:
        """Complete the upload, copy it to the final key (atomic), delete the temporary key. Cost: the
        upload's last parts, one CopyObject (server-side, no transfer through this process), two HEADs."""
        store = self.store
        self.sink.close()
        self.stream.close()  # completes the multipart upload of the temporary key
        uploaded = store.info(self.temp_key)
        if uploaded is None or uploaded.size != self.sink.size:
            raise store.error(
                f"the upload of {self.key} came back with {uploaded.size if uploaded else 'no'} bytes, "
                f"{self.sink.size} were written"
            )
        store.fs.copy_file(store.path(self.temp_key), store.path(self.key))
        try:
            store.fs.delete_file(store.path(self.temp_key))
        except OSError as exc:  # harmless: the next writer of this key (or the lifecycle rule) removes it
            log.warning("could not delete %s: %s", store.uri(self.temp_key), describe_error(exc))
        info = store.info(self.key)
        if info is None or info.size != self.sink.size:
            raise store.error(
                f"{self.key} is not in place after the copy ({info.size if info else 'absent'})"
            )
        self.info = info
        return info

    def discard(self) -> None:
        self.sink.abort()
        # pyarrow cannot abort a multipart upload: closing completes it (as a truncated temporary object),
        # which is then deleted; the final key is never touched
        with contextlib.suppress(Exception):
            if not self.stream.closed:
                self.stream.close()
        with contextlib.suppress(Exception):
            self.store.fs.delete_file(self.store.path(self.temp_key))


class S3Store(Store):
    """A bucket prefix on S3 or any S3-compatible server."""

    def __init__(self, url: str, setting: str = "PERF_PIPELINE_ARCHIVE_DIR") -> None:
        super().__init__(setting)
        try:
            self.bucket, self.prefix = split_s3_url(url)
        except ValueError as exc:
            raise StorageError(f"{setting}: {exc}") from None
        self.fs = s3_filesystem(self.bucket)

    @property
    def root_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def path(self, key: str) -> str:
        """``bucket/prefix/key``, as pyarrow.fs names objects."""
        return "/".join(p for p in (self.bucket, self.prefix, key.strip("/")) if p)

    def uri(self, key: str) -> str:
        _split_key(key)
        return f"s3://{self.path(key)}"

    def check(self) -> None:
        where = f"at {_endpoint()}"
        try:
            bucket = self.fs.get_file_info(self.bucket)
        except OSError as exc:
            if any(code in str(exc) for code in _REFUSED):
                raise self.error(
                    f"the credentials were refused for bucket {self.bucket!r} {where} (AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY, or the pod/instance role)",
                    exc,
                ) from exc
            raise self.error(f"cannot reach bucket {self.bucket!r} {where}", exc) from exc
        if bucket.type == pafs.FileType.NotFound:
            raise self.error(
                f"bucket {self.bucket!r} does not exist {where} (or these credentials cannot see it); "
                "create it first"
            )
        # the probe takes the archive's own path: an upload, its copy into place, deletes, a listing of .tmp/
        probe = f"{TMP_FOLDER}/.probe-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.write_bytes(probe, b"probe")
            self.fs.delete_file(self.path(probe))
        except (OSError, StorageError) as exc:
            raise self.error(
                f"cannot write to bucket {self.bucket!r} {where} (credentials from AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or the pod/instance role)",
                exc,
            ) from exc

    def writer(self, key: str, *, temp_tag: str | None = None) -> AtomicWriter:
        return _S3Writer(self, key, temp_tag)

    def info(self, key: str) -> ObjectInfo | None:
        try:
            with self.fs.open_input_file(self.path(key)) as f:  # a HEAD: size and the response's headers
                metadata, size = f.metadata(), f.size()
        except FileNotFoundError:
            return None
        etag = _header(metadata, "ETag")
        version = _header(metadata, "VersionId")
        return ObjectInfo(
            self.uri(key),
            size,
            etag.decode().strip('"') if etag else None,
            version.decode() if version else None,
        )

    def open_input(self, key: str) -> pa.NativeFile:
        return self.fs.open_input_file(self.path(key))

    def delete(self, key: str) -> bool:
        try:
            self.fs.delete_file(self.path(key))
        except FileNotFoundError:
            return False
        return True

    def walk(self, folder: str = "") -> list[str]:
        base = self.path(folder)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        root = self.path("") + "/"
        return sorted(i.path[len(root) :] for i in infos if i.type == pafs.FileType.File)

    def sweep_temps(self, key: str, temp_tag: str | None = None) -> list[str]:
        folder_key, name = _split_key(key)
        tag = _temp_tag(name, temp_tag)
        temp_folder = self.path("/".join(p for p in (TMP_FOLDER, folder_key) if p))
        infos = self.fs.get_file_info(pafs.FileSelector(temp_folder, allow_not_found=True))
        removed = []
        for found in infos:
            if found.type == pafs.FileType.File and found.base_name.startswith(f"{tag}-"):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(found.path)
                removed.append(found.base_name)
        return removed


# ------------------------------------------------------------------------------------------- opening


def open_store(location: Store | str | os.PathLike[str], setting: str) -> Store:
    """The store of a setting's value: a folder path, or an s3://bucket/prefix URL. No I/O (see
    :meth:`Store.check`). Raises :class:`StorageError` naming ``setting`` for a malformed URL."""
    if isinstance(location, Store):
        return location
    text = os.fspath(location)
    if text.startswith("s3://"):
        return S3Store(text, setting)
    if "://" in text:
        raise StorageError(f"{setting}: {text!r} is neither a folder path nor an s3://bucket/prefix URL")
    return LocalStore(text, setting)


def locate(uri: str, setting: str) -> tuple[Store, str]:
    """(store, key) of a recorded object URI: ``s3://bucket/key`` or a local absolute path. No I/O."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_url(uri)
        if not key:
            raise StorageError(f"{setting}: {uri!r} names a bucket, not an object")
        return S3Store(f"s3://{bucket}", setting), key
    if not uri:
        raise StorageError(f"{setting}: no file recorded")
    path = Path(uri)
    return LocalStore(path.parent, setting), path.name
