"""CNI error codes (the CNI spec's SPEC.md) and the error that carries one back to the plugin,
defined once: the plugin passes the code through to the runtime."""

from __future__ import annotations

from typing import Final

CNI_CONTAINER_UNKNOWN: Final = 3
CNI_INVALID_ENV: Final = 4
CNI_IO_FAILURE: Final = 5
CNI_DECODE_FAILURE: Final = 6
CNI_INVALID_CONFIG: Final = 7
CNI_TRY_AGAIN_LATER: Final = 11


class CaptureError(Exception):
    """A pod could not be captured (or released): `code` goes back to the runtime."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details
