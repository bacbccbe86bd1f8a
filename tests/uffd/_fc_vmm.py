"""A Firecracker-like VMM for the tests, run as a child process (raw syscalls only).

``python -m tests.uffd._fc_vmm SOCKET OFFSET:SIZE... [--close-socket]`` maps
anonymous memory per region, registers it with a userfaultfd made by the raw
syscall, sends Firecracker's handshake (no squibd field), optionally closes its
socket at once (as Firecracker v1.7 to v1.11 do), prints ``ready`` and then
obeys stdin lines: ``read PAGE`` prints the page's first 8 bytes in hex (read
with the GIL released, so the fault is served by the page server), ``quit``
exits.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import json
import mmap
import os
import socket
import struct
import sys

# Raw values from linux/userfaultfd.h and the x86_64 syscall table (independent of squibd).
RAW_NR_USERFAULTFD = 323
RAW_UFFDIO_API = 0xC018AA3F
RAW_UFFDIO_REGISTER = 0xC020AA00
RAW_UFFD_API = 0xAA
RAW_MODE_MISSING = 1
PAGE = os.sysconf("SC_PAGE_SIZE")
PREVIEW_BYTES = 8


def main(argv: list[str]) -> int:
    path, specs = argv[0], [a for a in argv[1:] if not a.startswith("--")]
    regions = [tuple(int(x, 0) for x in spec.split(":")) for spec in specs]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    uffd = libc.syscall(RAW_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if uffd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    fcntl.ioctl(uffd, RAW_UFFDIO_API, bytearray(struct.pack("<QQQ", RAW_UFFD_API, 0, 0)))
    maps = [mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            for _offset, size in regions]
    anchors = [ctypes.c_char.from_buffer(m) for m in maps]
    bases = [ctypes.addressof(a) for a in anchors]
    body = []
    for base, (offset, size) in zip(bases, regions, strict=True):
        fcntl.ioctl(uffd, RAW_UFFDIO_REGISTER,
                    bytearray(struct.pack("<QQQQ", base, size, RAW_MODE_MISSING, 0)))
        body.append({"base_host_virt_addr": base, "size": size, "offset": offset,
                     "page_size": PAGE, "page_size_kib": PAGE})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendmsg([json.dumps(body).encode()],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd]))])
    if "--close-socket" in argv:
        sock.close()
    print("ready", flush=True)
    buf = ctypes.create_string_buffer(PAGE)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["quit"]:
            break
        page = int(words[1])
        for base, (offset, size) in zip(bases, regions, strict=True):
            if offset <= page * PAGE < offset + size:
                ctypes.memmove(buf, base + page * PAGE - offset, PAGE)  # may fault
                print(buf.raw[:PREVIEW_BYTES].hex(), flush=True)
                break
        else:
            print("outside", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
