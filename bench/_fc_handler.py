"""A minimal Firecracker-style page-fault handler, for bench/uffd.py.

``python bench/_fc_handler.py SOCKET MEMORY_FILE``: binds SOCKET, prints
``listening``, accepts one VMM, reads its handshake (JSON regions + the
userfaultfd), then serves every page fault with UFFDIO_COPY from the memory
file, as Firecracker's example handlers do. It never writes to the socket
(no ready line, no squibd extension) and runs until killed.
"""

from __future__ import annotations

import array
import ctypes
import json
import mmap
import os
import select
import socket
import struct
import sys

# linux/userfaultfd.h (raw, independent of squibd)
UFFDIO_COPY = 0xC028AA03
UFFD_EVENT_PAGEFAULT = 0x12
MSG_SIZE = 32
MSG = struct.Struct("<BBHIQQQ")
COPY = struct.Struct("<QQQQq")
EEXIST = 17
PAGE = os.sysconf("SC_PAGE_SIZE")


def main(path: str, memory_file: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    with open(memory_file, "rb") as mem:
        source = mmap.mmap(mem.fileno(), 0, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = _address(source)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("listening", flush=True)
    conn, _ = listener.accept()
    data, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(4))
    fds = array.array("i")
    for _level, _kind, payload in anc:
        fds.frombytes(payload[: len(payload) - len(payload) % 4])
    uffd = fds[0]
    regions = json.loads(data)
    arg = ctypes.create_string_buffer(COPY.size)
    while True:
        select.select([uffd], [], [])
        try:
            raw = os.read(uffd, MSG_SIZE * 64)
        except BlockingIOError:
            continue
        for event, _r1, _r2, _r3, _flags, address, _ptid in MSG.iter_unpack(raw):
            if event != UFFD_EVENT_PAGEFAULT:
                continue  # remove events: nothing to track for this bench
            page = address - address % PAGE
            for region in regions:
                start = region["base_host_virt_addr"]
                if start <= page < start + region["size"]:
                    offset = region["offset"] + page - start
                    COPY.pack_into(arg, 0, page, base + offset, PAGE, 0, 0)
                    if libc.ioctl(uffd, UFFDIO_COPY, arg) < 0 and ctypes.get_errno() != EEXIST:
                        raise OSError(ctypes.get_errno(), "UFFDIO_COPY")
                    break


def _address(mapping: mmap.mmap) -> int:
    # The mapping stays alive (and exported) for the whole process: this never returns.
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
