"""moto's server (`python -m moto.server`) with conditional PUTs made atomic, as on S3.

moto checks `If-Match` / `If-None-Match` and then stores the object in two steps, with no
lock between them: two PUTs carrying the same `If-Match` etag can both pass the check when
their threads interleave (seen under load: a compare-and-swap counter lost an update). S3
itself decides each conditional write atomically, and that is what imgrepo's merge relies
on, so the tests' server serialises conditional PUTs. Everything else is moto unchanged.

    python -m testservers.moto_atomic -H 127.0.0.1 -p PORT
"""

from __future__ import annotations

import sys
import threading
from typing import Any


def make_conditional_puts_atomic() -> None:
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    original = S3Response.put_object

    def put_object(self: Any) -> Any:
        if self.headers.get("If-Match") or self.headers.get("If-None-Match"):
            with lock:
                return original(self)
        return original(self)

    S3Response.put_object = put_object  # type: ignore[method-assign]


if __name__ == "__main__":
    make_conditional_puts_atomic()
    from moto.server import main

    main(sys.argv[1:])
