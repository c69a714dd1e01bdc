"""Step tokens: the engine signs every step run it publishes, and an outcome must carry it back.

A token is a MAC (keyed BLAKE2b) of the run (workflow id, seq, attempt) under a secret made with the store
and kept in it, so only the engine that published a run can have made its token. An outcome
or a broker dead letter without the right token is refused and changes nothing: anyone who
can publish to the vhost could otherwise finish or fail any workflow whose id they know.
"""

from __future__ import annotations

import hashlib
import hmac


class Signer:
    """Keyed BLAKE2b (a MAC by design, and three times as fast here as HMAC-SHA256)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret[:64]  # BLAKE2b takes keys of up to 64 bytes

    def token(self, workflow_id: str, seq: int, attempt: int) -> str:
        message = f"{workflow_id}:{seq}:{attempt}".encode()
        return hashlib.blake2b(message, key=self._secret, digest_size=16).hexdigest()

    def valid(self, workflow_id: str, seq: int, attempt: int, token: str | None) -> bool:
        if not token:
            return False
        return hmac.compare_digest(token.encode(), self.token(workflow_id, seq, attempt).encode())
