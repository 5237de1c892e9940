"""A stand-in for the API worker, for fast tests of the daemon's supervision: a stdlib HTTP
server that answers /health as its script says, with no model behind it.

    python tests/fake_api_worker.py --port P --script FILE

FILE holds one behaviour per start, comma-separated; each start takes the next one (the last
repeats), and appends "<time> <pid> <behaviour>" to FILE.starts:

    crash      write an error line and exit 3 at once
    serve      answer /health with 200
    sicken:N   answer /health with 200 N times, then with 503 (alive but unhealthy)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def next_behaviour(script: Path) -> str:
    starts = script.with_name(script.name + ".starts")
    done = len(starts.read_text().splitlines()) if starts.exists() else 0
    steps = script.read_text().strip().split(",")
    behaviour = steps[min(done, len(steps) - 1)].strip()
    with starts.open("a") as out:
        out.write(f"{time.time():.3f} {os.getpid()} {behaviour}\n")
    return behaviour


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--script", type=Path, required=True)
    args = parser.parse_args()
    behaviour = next_behaviour(args.script)
    if behaviour == "crash":
        print("fake worker: planted start failure", file=sys.stderr, flush=True)
        return 3
    healthy_answers = int(behaviour.split(":")[1]) if behaviour.startswith("sicken:") else None

    class Health(BaseHTTPRequestHandler):
        answered = 0

        def do_GET(self) -> None:
            if self.path != "/health":
                self.send_error(404)
                return
            Health.answered += 1
            sick = healthy_answers is not None and Health.answered > healthy_answers
            self.send_response(503 if sick else 200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Health).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
