"""The smux frame: an 8-byte little-endian header and a payload. No I/O here.

Header layout (xtaci/smux ``frame.go``)::

    version u8 | cmd u8 | length u16 | stream_id u32

UPD (version 2 only) carries ``consumed u32 | window u32``.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "CMD_FIN",
    "CMD_NAMES",
    "CMD_NOP",
    "CMD_PSH",
    "CMD_SYN",
    "CMD_UPD",
    "HEADER",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "UPD",
    "encode_header",
    "encode_upd",
]

CMD_SYN: Final = 0  # open a stream
CMD_FIN: Final = 1  # this side sends no more on the stream
CMD_PSH: Final = 2  # data
CMD_NOP: Final = 3  # keepalive
CMD_UPD: Final = 4  # version 2 window update

CMD_NAMES: Final = {CMD_SYN: "SYN", CMD_FIN: "FIN", CMD_PSH: "PSH", CMD_NOP: "NOP", CMD_UPD: "UPD"}

HEADER: Final = struct.Struct("<BBHI")
HEADER_SIZE: Final = HEADER.size
UPD: Final = struct.Struct("<II")
MAX_PAYLOAD: Final = 0xFFFF

encode_header = HEADER.pack


def encode_upd(version: int, stream_id: int, consumed: int, window: int) -> bytes:
    """A whole UPD frame (header and payload), ready for one write."""
    return HEADER.pack(version, CMD_UPD, UPD.size, stream_id) + UPD.pack(consumed, window)
