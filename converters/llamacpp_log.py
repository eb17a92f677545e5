"""Route llama.cpp's C-side log lines into Python logging (logger ``llama_cpp.native``, DEBUG level).

llama-cpp-python prints some of llama.cpp's messages to stderr even with ``verbose=False`` (for
example a context-size notice when only a vocabulary is loaded).  Our commands print one clear line
per problem, so llama.cpp's own lines go to ``--debug`` logging instead.  Call
``route_llamacpp_logs()`` before creating a ``Llama`` or quantizing; it is idempotent.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger("llama_cpp.native")
_CALLBACK: object | None = None  # keeps the C callback alive while llama.cpp holds its pointer


def route_llamacpp_logs() -> None:
    global _CALLBACK
    if _CALLBACK is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace").rstrip()
        if message:
            logger.debug("%s", message)

    llama_cpp.llama_log_set(_forward, ctypes.c_void_p(0))
    _CALLBACK = _forward
