"""Shared-memory transport for frames between a hook and a server on one host.

The hook owns one segment, a file in ``/dev/shm`` named ``scopecast-{pid}-{8 hex}``: a control
block, a slot table and a ring of slots each big enough for one frame. A frame sent through it
is written into a free slot and the ZeroMQ message carries only the header, whose ``shm``
field names the segment, the slot and the slot's generation; the pixel frame is empty.

Slots are seqlocks: the hook bumps a slot's generation to odd before writing and to even after.
The reader checks the generation before and after it copies the pixels out; a slot written
again in between (the hook lapped the reader, or a stale message) is rejected and counted, never
read torn. The reader copies: its frame then lives as long as the server needs it (writer queue,
temporal rings, spill) without pinning a slot, and the slot is free again as soon as the copy is
done. The reader records the generation it finished with (``acked``); the hook reuses a slot only
once it was acked, and sends inline when no slot is free: it never laps a reader that keeps up,
and never waits for one that does not.

Negotiation: the first frame after each connection is sent inline with a ``shm_offer`` (segment
name and a fresh token); a reader that can map the segment writes the token back into the
control block, and only then does the hook send through the segment. A reader on another host
(an SSH tunnel to a loopback port) never answers, so that hook stays inline.

Clean-up: the hook unlinks its segment at close, once the reader acked every slot (or after
the close timeout). A segment whose creating process is gone is unlinked by the next hook that
creates one and by the reader (at close and when it maps a new one): the name holds the pid.

The generation protocol relies on the CPU keeping stores in order as other cores see them
(x86-64); elsewhere ``auto`` stays inline.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import platform
import re
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .protocol import DTYPES, ProtocolError

if TYPE_CHECKING:
    from .protocol import FrameHeader, ShmOffer

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
MAGIC = b"SCOPESHM"
LAYOUT = 1
PAGE = 4096
MAX_SLOTS = 64
#: Segments a reader keeps mapped at once (least recently used are unmapped first).
MAX_SEGMENTS = 16
NAME = re.compile(r"^scopecast-(?P<pid>[1-9][0-9]{0,9})-[0-9a-f]{8}$")
_CONTROL = 64  # magic, layout, slots, slot bytes, creator pid, offer token, accepted token
# control block words (uint64 index): 0 magic, 1 layout | slots << 32, 2 slot bytes,
# 3 creator pid, 4 offer token (hook), 5 accepted token (reader), 6 reader pid
_W_SLOTS, _W_SLOT_BYTES, _W_PID, _W_OFFER, _W_ACCEPTED, _W_READER = 1, 2, 3, 4, 5, 6


class ShmRefused(ProtocolError):
    """A shared-memory reference that names no usable segment or lies outside it (a stale or
    forged header): rejected like a bad buffer."""

    kind: ClassVar[str] = "shm"

    def __init__(self, message: str, stream: str | None = None) -> None:
        super().__init__(message)
        self.stream = stream


class ShmOverwritten(ShmRefused):
    """A slot written again before or while the reader copied it: never read torn."""

    kind: ClassVar[str] = "shm_overwritten"


def available() -> str | None:
    """None if this machine can use the shared-memory transport, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the slot protocol needs x86-64 store ordering, this CPU is {platform.machine()}"
    if not SHM_DIR.is_dir() or not os.access(SHM_DIR, os.W_OK):
        return f"{SHM_DIR} is not a writable folder"
    return None


def _header_bytes(slots: int) -> int:
    return -(-(_CONTROL + 16 * slots) // PAGE) * PAGE


def segment_bytes(slots: int, slot_bytes: int) -> int:
    """The size of a segment of ``slots`` slots of ``slot_bytes``."""
    return _header_bytes(slots) + slots * slot_bytes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_stale(directory: Path = SHM_DIR) -> list[str]:
    """Unlink this user's segments whose creating process is gone; return their names."""
    gone = []
    with contextlib.suppress(OSError):
        for path in directory.glob("scopecast-*"):
            m = NAME.match(path.name)
            with contextlib.suppress(OSError):
                if m and path.lstat().st_uid == os.geteuid() and not _pid_alive(int(m["pid"])):
                    path.unlink()
                    gone.append(path.name)
    if gone:
        log.info("unlinked %d shared-memory segment(s) of exited hooks: %s", len(gone), gone)
    return gone


class _Mapping:
    """One mapped segment: control words, slot table (generation, acked) and slot data."""

    def __init__(self, fd: int, size: int, slots: int, slot_bytes: int) -> None:
        self.fd, self.size, self.slots, self.slot_bytes = fd, size, slots, slot_bytes
        self.mm = mmap.mmap(fd, size)
        self.control = np.frombuffer(self.mm, np.uint64, _CONTROL // 8, 0)
        table = np.frombuffer(self.mm, np.uint64, 2 * slots, _CONTROL).reshape(slots, 2)
        self.generation, self.acked = table[:, 0], table[:, 1]
        self.data_offset = _header_bytes(slots)

    def view(self, slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = int(np.prod(shape))
        offset = self.data_offset + slot * self.slot_bytes
        return np.frombuffer(self.mm, dtype, count, offset).reshape(shape)

    def close(self) -> None:
        del self.control, self.generation, self.acked
        try:
            self.mm.close()
        finally:
            os.close(self.fd)


class ShmRing:
    """The hook's side: a segment it created, its slots, and which slots a reader still owes."""

    def __init__(self, slots: int, slot_bytes: int, directory: Path = SHM_DIR) -> None:
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"shm slots {slots} must be 1..{MAX_SLOTS}")
        slot_bytes = max(PAGE, -(-slot_bytes // PAGE) * PAGE)
        sweep_stale(directory)
        self.name = f"scopecast-{os.getpid()}-{secrets.token_hex(4)}"
        self.path = directory / self.name
        size = segment_bytes(slots, slot_bytes)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # reserve the pages now: a full /dev/shm is an error here, not a SIGBUS mid-frame
            os.posix_fallocate(fd, 0, size)
            self._map = _Mapping(fd, size, slots, slot_bytes)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        c = self._map.control
        c[0] = np.frombuffer(MAGIC, np.uint64)[0]
        c[_W_SLOTS] = LAYOUT | slots << 32
        c[_W_SLOT_BYTES], c[_W_PID] = slot_bytes, os.getpid()
        self.slots, self.slot_bytes = slots, slot_bytes
        self._pending = np.zeros(slots, np.uint64)  # generation sent and not yet acked, or 0
        self._next = 0
        self.token = 0

    def offer(self) -> int:
        """A fresh token for a ``shm_offer``: the reader that maps the segment writes it back."""
        self.token = secrets.randbits(63) or 1
        self._map.control[_W_OFFER] = self.token
        return self.token

    @property
    def accepted(self) -> bool:
        """Whether a reader answered the latest offer."""
        return self.token != 0 and int(self._map.control[_W_ACCEPTED]) == self.token

    def take(self) -> int | None:
        """A free slot (acked by the reader, or never sent), or None if every slot is owed."""
        acked = self._map.acked
        for k in range(self.slots):
            i = (self._next + k) % self.slots
            if self._pending[i] == 0 or acked[i] >= self._pending[i]:
                self._pending[i] = 0
                self._next = (i + 1) % self.slots
                return i
        return None

    def write(self, slot: int, img: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> int:
        """Write one frame into ``slot`` under its seqlock; return the generation to send."""
        gen = self._map.generation
        g = int(gen[slot]) + 1 | 1  # odd: being written
        gen[slot] = g
        np.copyto(self._map.view(slot, shape, dtype), img, casting="same_kind")
        gen[slot] = g + 1
        self._pending[slot] = g + 1
        return g + 1

    def release(self, slot: int) -> None:
        """The frame in ``slot`` was not handed over: nobody will read it."""
        self._pending[slot] = 0

    def reset(self) -> None:
        """The reader went away: nothing is owed any more; a new reader must accept anew."""
        self._pending[:] = 0
        self.token = 0

    @property
    def pending(self) -> int:
        """Frames sent through the ring that the reader has not finished with yet."""
        acked = self._map.acked
        return int(np.count_nonzero((self._pending != 0) & (acked < self._pending)))

    def close(self) -> None:
        """Unmap and unlink the segment (a reader that mapped it keeps its mapping)."""
        self.path.unlink(missing_ok=True)
        self._map.close()


class ShmReader:
    """The receiver's side: maps the segments hooks name, copies frames out, acks slots."""

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self.directory = directory
        self._maps: dict[str, _Mapping] = {}

    def accept(self, offer: ShmOffer) -> None:
        """Map the offered segment and write its token back; raise ShmRefused if it is not
        usable (the hook then keeps sending inline)."""
        seg = self._segment(offer.name, None)
        seg.control[_W_READER] = os.getpid()
        seg.control[_W_ACCEPTED] = offer.token

    def read(self, header: FrameHeader) -> np.ndarray:
        """A copy of the pixels the header's ``shm`` reference points at; ShmRefused for a
        reference outside its segment, ShmOverwritten for a slot written again."""
        ref = header.shm
        if ref is None:
            raise ShmRefused("header has no shm reference", header.stream)
        seg = self._segment(ref.name, header.stream)
        if ref.slot >= seg.slots:
            raise ShmRefused(
                f"shm slot {ref.slot} is outside segment {ref.name} ({seg.slots} slots)",
                header.stream,
            )
        if header.nbytes > seg.slot_bytes:
            raise ShmRefused(
                f"frame {header.shape} {header.dtype} ({header.nbytes} bytes) does not fit a "
                f"{seg.slot_bytes}-byte slot of {ref.name}",
                header.stream,
            )
        if os.fstat(seg.fd).st_size < seg.size:  # shrunk under us: reading would SIGBUS
            self._drop(ref.name)
            raise ShmRefused(f"segment {ref.name} was truncated", header.stream)
        if int(seg.generation[ref.slot]) != ref.generation:
            raise ShmOverwritten(
                f"slot {ref.slot} of {ref.name} holds generation {int(seg.generation[ref.slot])}, "
                f"not {ref.generation}: written again before it was read",
                header.stream,
            )
        dtype = DTYPES[header.dtype]
        out = np.empty(header.shape, dtype)
        self._copy(out, seg.view(ref.slot, header.shape, dtype))
        after = int(seg.generation[ref.slot])
        # acked only ever grows: a late stale message cannot un-ack a newer generation
        seg.acked[ref.slot] = max(int(seg.acked[ref.slot]), ref.generation)
        if after != ref.generation:
            raise ShmOverwritten(
                f"slot {ref.slot} of {ref.name} was written again while it was read "
                f"(generation {ref.generation} -> {after}): frame dropped, not read torn",
                header.stream,
            )
        return out

    @staticmethod
    def _copy(out: np.ndarray, src: np.ndarray) -> None:
        np.copyto(out, src)

    def _segment(self, name: str, stream: str | None) -> _Mapping:
        if (seg := self._maps.get(name)) is not None:
            self._maps[name] = self._maps.pop(name)  # most recently used last
            return seg
        if not NAME.match(name):
            raise ShmRefused(f"shm segment name {name[:80]!r} is not a scopecast segment", stream)
        if len(self._maps) >= MAX_SEGMENTS:
            self._drop(next(iter(self._maps)))
        self.tidy()
        seg = self._attach(name, stream)
        self._maps[name] = seg
        return seg

    def _attach(self, name: str, stream: str | None) -> _Mapping:
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise ShmRefused(f"cannot open shm segment {name}: {e.strerror}", stream) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise ShmRefused(f"shm segment {name} is not a file of this user", stream)
            if st.st_size < PAGE:
                raise ShmRefused(f"shm segment {name} is {st.st_size} bytes: too small", stream)
            head = os.pread(fd, _CONTROL, 0)
            words = np.frombuffer(head, np.uint64)
            slots, layout = int(words[_W_SLOTS]) >> 32, int(words[_W_SLOTS]) & 0xFFFFFFFF
            slot_bytes = int(words[_W_SLOT_BYTES])
            if head[:8] != MAGIC or layout != LAYOUT:
                raise ShmRefused(f"shm segment {name} has no scopecast layout {LAYOUT}", stream)
            if not (1 <= slots <= MAX_SLOTS and slot_bytes > 0 and slot_bytes % PAGE == 0):
                raise ShmRefused(
                    f"shm segment {name}: {slots} slots of {slot_bytes} bytes is no valid ring",
                    stream,
                )
            size = segment_bytes(slots, slot_bytes)
            if st.st_size != size:
                raise ShmRefused(
                    f"shm segment {name} is {st.st_size} bytes, its ring needs {size}", stream
                )
            return _Mapping(fd, size, slots, slot_bytes)
        except BaseException:
            os.close(fd)
            raise

    def _drop(self, name: str) -> None:
        seg = self._maps.pop(name, None)
        if seg is not None:
            seg.close()

    def tidy(self) -> None:
        """Unmap segments their hook unlinked; unlink those of hooks that exited."""
        sweep_stale(self.directory)
        for name, seg in list(self._maps.items()):
            with contextlib.suppress(OSError):
                if os.fstat(seg.fd).st_nlink == 0:
                    self._drop(name)

    @property
    def segments(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        for name in list(self._maps):
            self._drop(name)
        sweep_stale(self.directory)
