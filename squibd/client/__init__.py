"""squibd's public client library.

A five-line script::

    from squibd.client import Client

    with Client() as squibd:            # $SQUIBD_SOCKET, else the daemon's default socket
        squibd.snapshot_create("vm1", "/var/lib/squibd/vm1.snap", "/var/lib/squibd/vm1.mem",
                               labels={"reason": "nightly"})
        for pair in squibd.snapshot_list(root="/var/lib/squibd")["snapshots"]:
            print(pair["snapshot_path"], pair["labels"])

:class:`Client` blocks; :class:`AsyncClient` runs under trio and asyncio (anyio).
Both have ``call(method, params)`` and one typed method per JSON-RPC method
(``vm.create`` -> ``vm_create``...). Errors of the daemon raise
:class:`SquibdError` (``code``, ``kind``, ``fault_message``).
"""

from ._async import AsyncClient
from ._common import (
    DaemonUnreachable,
    ProgressCallback,
    SquibdError,
    TypedMethods,
    default_socket_path,
)
from ._sync import Client

__all__ = [
    "AsyncClient",
    "Client",
    "DaemonUnreachable",
    "ProgressCallback",
    "SquibdError",
    "TypedMethods",
    "default_socket_path",
    "method_name",
]


def method_name(rpc_method: str) -> str:
    """The client method of a JSON-RPC method: ``vm.create`` -> ``vm_create``."""
    return rpc_method.replace(".", "_")
