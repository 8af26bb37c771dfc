"""Container health probe: exit 0 when GET http://127.0.0.1:$CONV_PORT<path> answers 200, else 1.

Used by the image's HEALTHCHECK and by docker-compose.yml, because the base image ships no curl or
wget and Python is already there. The path is the first argument (default /readyz); the port is the
server's own setting, CONV_PORT (default 8000), so one probe follows whatever port the server binds.
"""

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PATH = "/readyz"
DEFAULT_PORT = "8000"
TIMEOUT_S = 4.0


def probe(path: str, port: str) -> int:
    """Returns the process exit code: 0 if the route answered 200, 1 otherwise."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as error:
        print(f"healthcheck: {url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    route = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PATH
    sys.exit(probe(route, os.environ.get("CONV_PORT", DEFAULT_PORT)))
