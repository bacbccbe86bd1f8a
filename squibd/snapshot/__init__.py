"""The snapshot format and storage: synchronous, thread-safe, no trio.

Public names are re-exported here as the modules land.
"""

from .errors import (
    TEMPLATES,
    AtomicCommitCrossFs,
    AtomicCommitFailed,
    Bitcode,
    Capture,
    CrcMismatch,
    Incompatible,
    InvalidPath,
    Io,
    MagicMismatch,
    MemoryIo,
    QuiesceTimeout,
    SizeLimitExceeded,
    SnapshotError,
    TooShort,
    VersionMismatch,
)

__all__ = [
    "TEMPLATES",
    "AtomicCommitCrossFs",
    "AtomicCommitFailed",
    "Bitcode",
    "Capture",
    "CrcMismatch",
    "Incompatible",
    "InvalidPath",
    "Io",
    "MagicMismatch",
    "MemoryIo",
    "QuiesceTimeout",
    "SizeLimitExceeded",
    "SnapshotError",
    "TooShort",
    "VersionMismatch",
]

# --- memory files (issue 3) ---------------------------------------------------
from .bitmap import DirtyBitmap, run_arrays_from_words, runs_from_words
from .digest import DEFAULT_ALGORITHM, available_algorithms, digest_function
from .granule import AdaptiveGranule, GranuleConfig
from .memerrors import (
    MemoryDigestMismatch,
    MemoryInputInvalid,
    MemoryPairMismatch,
)
from .memwriter import (
    PAIR_XATTR,
    RegionSource,
    WriteCancelled,
    WriteResult,
    build_manifest,
    new_pair_id,
    read_pair_xattr,
    set_pair_xattr,
    write_memory,
)
from .rebase import memory_path_for, rebase
from .verify import VERIFY_MODES, verify

__all__ += [
    "DEFAULT_ALGORITHM",
    "PAIR_XATTR",
    "VERIFY_MODES",
    "AdaptiveGranule",
    "DirtyBitmap",
    "GranuleConfig",
    "MemoryDigestMismatch",
    "MemoryInputInvalid",
    "MemoryPairMismatch",
    "RegionSource",
    "WriteCancelled",
    "WriteResult",
    "available_algorithms",
    "build_manifest",
    "digest_function",
    "memory_path_for",
    "new_pair_id",
    "read_pair_xattr",
    "rebase",
    "run_arrays_from_words",
    "runs_from_words",
    "set_pair_xattr",
    "verify",
    "write_memory",
]

# --- snapshot format (issue 2) ------------------------------------------------
from .codec import decode_body, encode_body, make_state_converter  # noqa: E402
from .commit import (  # noqa: E402
    COMMIT_STEPS,
    PairTransaction,
    recover_directory,
    recover_pair,
)
from .compat import check_compatible  # noqa: E402
from .describe import Description, describe_snapshot, render_text  # noqa: E402
from .envelope import (  # noqa: E402
    MAGIC_AARCH64,
    MAGIC_X86_64,
    STATE_SIZE_LIMIT,
    STATE_VERSION,
    crc64,
    decode_state,
    encode_state,
    read_state_file,
)
from .paths import validate_path  # noqa: E402

__all__ += [
    "COMMIT_STEPS",
    "MAGIC_AARCH64",
    "MAGIC_X86_64",
    "STATE_SIZE_LIMIT",
    "STATE_VERSION",
    "Description",
    "PairTransaction",
    "check_compatible",
    "crc64",
    "decode_body",
    "decode_state",
    "describe_snapshot",
    "encode_body",
    "encode_state",
    "make_state_converter",
    "read_state_file",
    "recover_directory",
    "recover_pair",
    "render_text",
    "validate_path",
]
