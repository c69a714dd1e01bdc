"""Step tokens: the engine signs every step run it publishes, and an outcome must carry it back.

A token is an HMAC of the run (workflow id, seq, attempt) under a secret made with the store
and kept in it, so only the engine that published a run can have made its token. An outcome
or a broker dead letter without the right token is refused and changes nothing: anyone who
can publish to the vhost could otherwise finish or fail any workflow whose id they know.
"""

from __future__ import annotations

import hashlib
import hmac


class Signer:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def token(self, workflow_id: str, seq: int, attempt: int) -> str:
        message = f"{workflow_id}:{seq}:{attempt}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def valid(self, workflow_id: str, seq: int, attempt: int, token: str | None) -> bool:
        if not token:
            return False
        return hmac.compare_digest(token.encode(), self.token(workflow_id, seq, attempt).encode())
