"""The method table: params/results models, handlers, error mapping, wire converter.

The only package that knows both the wire (``squibd.rpc``) and the VM
runtime (``squibd.vm``).
"""

from .context import ApiContext, CallInfo, ProgressSink
from .errors import CANCELLED_KIND, NotAllowed, cancelled_error, map_exception, not_allowed
from .methods import METHODS, MethodSpec, UnexpectedHandlerError, dispatch, lookup
from .wire import make_wire_converter, structure_params, unstructure_result

__all__ = [
    "CANCELLED_KIND",
    "METHODS",
    "ApiContext",
    "CallInfo",
    "MethodSpec",
    "NotAllowed",
    "ProgressSink",
    "UnexpectedHandlerError",
    "cancelled_error",
    "dispatch",
    "lookup",
    "make_wire_converter",
    "map_exception",
    "not_allowed",
    "structure_params",
    "unstructure_result",
]
