"""``python -m examples.pika_service``: serve the grant workflow's four steps with pika."""

from __future__ import annotations

import sys

from examples.pika_service.service import main

if __name__ == "__main__":
    sys.exit(main())
