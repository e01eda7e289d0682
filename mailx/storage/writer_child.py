# -*- test-case-name: tests.test_writer -*-
"""The Maildir writer child: the standard library and `mailx.storage.maildir`, nothing else.

`mailx.storage.writer` explains why filing happens in a child process and starts
this file as ``python3 -I -S .../writer_child.py``.  The child imports no
third-party package (no Twisted, no cryptography): it starts in a few tens
of milliseconds and stays at about 12 MiB resident where a second copy of
the server's imports cost about 30 MiB.  ``-I`` keeps ``PYTHONPATH`` and the
user's site out, ``-S`` the site-packages; ``mailx.storage.maildir`` is found by
this file's own location, so the child runs the very code of the server
that started it, installed or not.  ``tests.test_writer`` checks that the
child's imports stay inside the standard library.

The protocol on the child's stdin/stdout is frames of ``>II`` (length of a
JSON header, length of a payload), then the header and the payload.  A
request names the copies to write (Maildir, file name, length of its own
header block) and carries those header blocks and the body, or the path of
a spooled body.  The child answers each request with the paths it wrote or
an error.  Everything readable at once is one batch: each directory renamed
into is fsynced once per batch, before any answer of the batch is sent, so
an answer always means "on disk".  A request that fails takes its own
copies back; nothing half-written is ever visible in ``new/``.
"""

from __future__ import annotations

import json
import os
import select
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Run as a file under -I: the package is found by where this file is.
    # Appended, so nothing beside the package can shadow the standard library.
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from mailx.storage import maildir  # noqa: E402  (stdlib only: the Maildir primitive)

FRAME = struct.Struct(">II")
READ_CHUNK = 1024 * 1024


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    meta = json.dumps(header, separators=(",", ":")).encode()
    return FRAME.pack(len(meta), len(payload)) + meta + payload


def decode_all(buffer: bytearray) -> list[tuple[dict[str, Any], bytes]]:
    """Remove and return every complete frame at the start of ``buffer``."""
    frames = []
    offset = 0
    while len(buffer) - offset >= FRAME.size:
        meta_len, payload_len = FRAME.unpack_from(buffer, offset)
        end = offset + FRAME.size + meta_len + payload_len
        if len(buffer) < end:
            break
        start = offset + FRAME.size
        header = json.loads(bytes(buffer[start : start + meta_len]))
        frames.append((header, bytes(buffer[start + meta_len : end])))
        offset = end
    del buffer[:offset]
    return frames


def _body_chunks(request: dict[str, Any], payload: bytes, heads_length: int) -> Iterator[bytes]:
    if "body_path" in request:
        with open(request["body_path"], "rb") as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk
    else:
        yield payload[heads_length:]


def file_request(request: dict[str, Any], payload: bytes, sync_later: Any) -> list[str]:
    """Write every copy of one message; all or none."""
    written: list[Path] = []
    heads_length = sum(copy["head"] for copy in request["copies"])
    offset = 0
    try:
        for copy in request["copies"]:
            head = payload[offset : offset + copy["head"]]
            offset += copy["head"]
            box = Path(copy["maildir"])
            if copy.get("folder"):
                box = maildir.ensure_folder(box, copy["folder"])
            parts = _chain(head, maildir.lf_chunks(_body_chunks(request, payload, heads_length)))
            written.append(maildir.write_message(box, copy["name"], parts, sync_later))
    except BaseException:
        for path in written:
            maildir.remove_message(path)
        raise
    return [str(p) for p in written]


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def commit(frames: Sequence[tuple[dict[str, Any], bytes]]) -> bytes:
    """File a batch; the answers, once every directory is fsynced."""
    directories: dict[Path, list[int]] = {}
    answers: list[dict[str, Any]] = []
    for index, (request, payload) in enumerate(frames):
        try:
            paths = file_request(
                request, payload, lambda d, i=index: directories.setdefault(d, []).append(i)
            )
            answers.append({"id": request["id"], "paths": paths})
        except Exception as e:  # the parent answers 451 and logs it
            answers.append({"id": request["id"], "error": f"{type(e).__name__}: {e}"})
    for directory, members in directories.items():
        try:
            maildir.fsync_directory(directory)
        except OSError as e:
            for index in members:
                answers[index] = {"id": answers[index]["id"], "error": f"fsync {directory}: {e}"}
    return b"".join(encode(answer) for answer in answers)


def main() -> int:
    """Serve requests on stdin until it closes."""
    buffer = bytearray()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    eof = False
    while True:
        frames = decode_all(buffer)
        if not frames:
            if eof:
                return 0
            data = os.read(stdin, READ_CHUNK)
            if not data:
                eof = True
            buffer += data
            continue
        # Whatever else has arrived joins this batch (group commit).
        while not eof and select.select([stdin], [], [], 0)[0]:
            data = os.read(stdin, READ_CHUNK)
            if not data:
                eof = True
            buffer += data
        frames += decode_all(buffer)
        answer = memoryview(commit(frames))
        while answer:
            answer = answer[os.write(stdout, answer) :]


if __name__ == "__main__":
    sys.exit(main())
