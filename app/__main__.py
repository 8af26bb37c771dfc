"""`python -m app`: serve app.main:app with uvicorn on CONV_HOST:CONV_PORT."""

from __future__ import annotations

import uvicorn

from app.config import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level in ("debug", "trace"),
    )


if __name__ == "__main__":
    main()
