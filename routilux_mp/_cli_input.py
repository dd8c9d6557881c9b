"""The input of ``routilux-mp run``: JSONL from a file or stdin, plain or compressed, checked line by line.

A regular file (also stdin redirected from one) is opened once and read
twice through the same descriptor: a first pass checks every line and counts
them (so no job starts from a malformed file, and the progress display has a
total and an ETA), the second pass posts them. A stream (a pipe, a FIFO) can
be read only once: each line is checked as it is posted, and there is no
total to show.

gzip, bzip2 and xz input is recognised by its magic bytes, whatever the file
is called, and decompressed as it is read (so ``--input data.jsonl.gz`` and
``zcat``-less pipes work); the total is the number of lines, counted by the
checking pass.

A line is accepted iff it is one JSON object in UTF-8 (a leading BOM on line 1
is allowed) that can travel through the runtime and back out as JSON:

* no ``NaN``/``Infinity``, and no number too large for a float (``1e400``
  would silently become ``inf``, which JSON cannot write back);
* at most :data:`MAX_DEPTH` (200) levels of nested arrays and objects (deeper
  data overflows the recursion limits of pickle and json on its way to the output).

Strings holding lone UTF-16 surrogates (``"\\ud800"``) are valid JSON and
are accepted; the output writers escape them (see :mod:`routilux_mp._cli_output`).
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import stat
import sys
import zlib
from collections.abc import Iterator
from typing import IO, Any

from ._cli_exit import EXIT_USAGE, CliError

__all__ = ["MAX_DEPTH", "InputSource", "parse_line"]

#: Deepest nesting of arrays and objects accepted in an input line. Data crosses processes through
#: cloudpickle (about two frames per level) and is written back with json (one per level), both
#: stopped by the interpreter's recursion limit (1000 frames): 500 levels already fail to pickle;
#: 200 leaves room for the frames of every process the data passes through.
MAX_DEPTH = 200

#: Compression formats by magic bytes: (name for messages, magic, opener of a decompressing reader).
_FORMATS: tuple[tuple[str, bytes, Any], ...] = (
    ("gzip", b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    ("bzip2", b"BZh", bz2.BZ2File),
    ("xz", b"\xfd7zXZ\x00", lzma.LZMAFile),
)
_MAGIC_BYTES = max(len(magic) for _, magic, _ in _FORMATS)
#: What a corrupt or truncated compressed stream raises while it is read.
_CORRUPT = (EOFError, OSError, zlib.error, lzma.LZMAError)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text} is too large for a float")
    return value


#: Strict JSON: NaN and Infinity, which json.loads accepts, could not be written back as JSON.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests arrays/objects more than ``limit`` levels deep (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_line(raw: bytes, number: int, label: str) -> dict:
    """The JSON object on input line ``number``; ``CliError`` (exit 2) naming the line if it is not one."""
    if number == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    where = f"{label} line {number}"
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CliError(EXIT_USAGE, f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise CliError(EXIT_USAGE, f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # NaN, Infinity, 1e400, an integer of more than 4300 digits
        raise CliError(EXIT_USAGE, f"{where}: not valid JSON ({exc})") from None
    except RecursionError:  # the decoder's own limit, near 1000 levels
        raise CliError(EXIT_USAGE, f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(value, dict):
        raise CliError(EXIT_USAGE, f"{where}: each line must be a JSON object, got {type(value).__name__}")
    # Counting brackets is C-fast and bounds the depth from above (brackets in strings count too):
    # only lines that might be too deep pay for the exact walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise CliError(EXIT_USAGE, f"{where}: nested more than {MAX_DEPTH} levels deep")
    return value


class _Prepend(io.RawIOBase):
    """A stream that yields ``prefix``, then the rest of ``stream``: the magic bytes read from a pipe go back."""

    def __init__(self, prefix: bytes, stream: IO[bytes]) -> None:
        super().__init__()
        self._prefix = prefix
        self._stream = stream

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        super().close()
        self._stream.close()

    def readinto(self, buffer: Any) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._stream.read1(len(buffer))  # type: ignore[attr-defined]
        buffer[:len(data)] = data
        return len(data)


class InputSource:
    """Where the jobs come from: a path, or ``-`` for stdin.

    Attributes:
        label: how messages name it (``<stdin>`` or the path).
        total: lines counted by :meth:`validate` (``None`` for a stream: it is not known in advance).
        compression: ``"gzip"``, ``"bzip2"``, ``"xz"`` or ``None``.
        file_stat: ``os.stat_result`` of the input when it is a regular file (for same-file checks), else ``None``.
    """

    def __init__(self, path: str) -> None:
        self.label = "<stdin>" if path == "-" else path
        self.total: int | None = None
        if path != "-" and os.path.isdir(path):
            raise CliError(EXIT_USAGE, f"cannot read input {path!r}: it is a directory")
        try:
            # stdin gets a reader of our own: the poster thread may be blocked in it at exit, and
            # the interpreter must not wait on sys.stdin's lock then.
            self._raw: IO[bytes] = (open(sys.stdin.fileno(), "rb", closefd=False) if path == "-"  # noqa: SIM115
                                    else open(path, "rb"))  # noqa: SIM115 -- both closed by close()
        except (OSError, ValueError, AttributeError) as exc:  # stdin closed: ValueError, or no sys.stdin at all
            why = "no such file" if isinstance(exc, FileNotFoundError) else getattr(exc, "strerror", None) or exc
            raise CliError(EXIT_USAGE, f"cannot read input {self.label!r}: {why}") from None
        st = os.fstat(self._raw.fileno())
        self.file_stat = st if stat.S_ISREG(st.st_mode) else None
        # A regular file is read twice from where it starts; a pipe, FIFO or device only once.
        self._start = self._raw.tell() if self.file_stat is not None else None
        self._consumed = False
        self.compression, self._opener = self._sniff()

    @property
    def seekable(self) -> bool:
        """Whether the input is a regular file: checked whole before the run, and counted."""
        return self._start is not None

    def _sniff(self) -> tuple[str | None, Any]:
        if self._start is not None:
            head = self._raw.read(_MAGIC_BYTES)
            self._raw.seek(self._start)
        else:
            # Peek: whatever the first read brings, without waiting for more (a producer may
            # send one short line and pause). Only data that starts like a compressed stream
            # is read on to its full magic, and put back in front of the rest.
            head = self._raw.peek(_MAGIC_BYTES)[:_MAGIC_BYTES]  # type: ignore[attr-defined]
            if head and any(len(head) < len(magic) and magic.startswith(head) for _, magic, _ in _FORMATS):
                head = self._raw.read(_MAGIC_BYTES)
                self._raw = io.BufferedReader(_Prepend(head, self._raw))
        for name, magic, opener in _FORMATS:
            if head.startswith(magic):
                return name, opener
        return None, None

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """``(line_number, raw bytes)`` of every line, decompressed; ``CliError`` if the data is corrupt."""
        if self._start is not None:
            self._raw.seek(self._start)
        elif self._consumed:
            raise RuntimeError("a stream input can be read only once")
        self._consumed = True
        stream = self._opener(self._raw) if self._opener is not None else self._raw
        number = 0
        try:
            for number, raw in enumerate(stream, 1):  # ``number`` outlives the loop: the last good line
                yield number, raw
        except _CORRUPT as exc:
            if self.compression is None:
                raise CliError(EXIT_USAGE, f"cannot read input {self.label!r} after line {number}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
            raise CliError(EXIT_USAGE, f"{self.label}: the {self.compression} data is corrupt or truncated "
                           f"after line {number} ({exc}); was it copied whole? Check or re-create the file") from None
        finally:
            if stream is not self._raw:
                stream.close()  # the decompressor only: the file stays open for the next pass

    def fingerprint(self) -> str:
        """SHA-256 of the file's bytes as stored (compressed or not): what tells a resumed run's input apart."""
        if self._start is None:
            raise RuntimeError("a stream input has no fingerprint")
        digest = hashlib.sha256()
        self._raw.seek(self._start)
        while chunk := self._raw.read(1 << 20):
            digest.update(chunk)
        self._raw.seek(self._start)
        return digest.hexdigest()

    def validate(self) -> None:
        """For a regular file, check every line before any job starts, and count them in :attr:`total`."""
        if not self.seekable:
            return
        count = 0
        for number, raw in self._lines():
            if raw.strip():
                parse_line(raw, number, self.label)
                count += 1
        self.total = count

    def records(self) -> Iterator[tuple[int, dict]]:
        """``(line_number, object)`` per non-blank line, checked again as it is read (exit 2 at a bad one)."""
        for number, raw in self._lines():
            if raw.strip():
                try:
                    value = parse_line(raw, number, self.label)
                except CliError as exc:
                    if self.seekable:  # it was valid when checked: someone is writing to the input
                        raise CliError(EXIT_USAGE, f"{self.label} changed while it was read: {exc} (every line "
                                       "was valid when checked before the run)") from None
                    raise
                yield number, value

    def close(self) -> None:
        self._raw.close()
