"""A real S3 API server (moto's, from PyPI) on 127.0.0.1 and a fault-injecting proxy in front
of it, both started and stopped by the tests that use them.

The server's request log (werkzeug's access lines on its stderr) is what the "one download per
file" tests count. The proxy forwards every request and, with a seeded random choice per
request, injects one fault: a dropped connection, a 500, a body cut short, a flipped byte, or
a slow body (for kill -9 tests). It counts what it did.
"""

import http.client
import http.server
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

BUCKET = "rankfeed-test"
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class MotoServer:
    """`python -m moto.server` on a free port, its request log in `log_path`."""

    def __init__(self, workdir):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"moto-{self.port}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
        wait_port(self.port)
        self.client().create_bucket(Bucket=BUCKET)

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def env(self, endpoint=None):
        """The environment a rankfeed process needs to reach this server (or a proxy)."""
        return {**ENV, "AWS_ENDPOINT_URL": endpoint or self.endpoint}

    def requests(self):
        """(method, path, status) of every request the server has answered so far."""
        self._log.flush()
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        return [(m, p.split("?")[0], int(s)) for m, p, s in
                re.findall(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.1" (\d+)', text)]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


FAULTS = ("drop", "500", "truncate", "flip")


class FaultProxy:
    """An HTTP/1.1 proxy to `upstream` on a free port. `rate`: the share of requests given a
    fault (drawn from `faults` with a seeded RNG); `only`: a regex the request path must match
    to be eligible (default: every GET). `slow`: seconds to sleep per 64 KiB of a GET body."""

    def __init__(self, upstream_port, *, rate=0.0, faults=FAULTS, seed=0, only=None, slow=0.0,
                 methods=("GET",)):
        self.upstream_port = upstream_port
        self.rate, self.faults, self.slow = rate, tuple(faults), slow
        self.only = re.compile(only) if only else None
        self.methods = set(methods)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {f: 0 for f in FAULTS}
        self.requests = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status, reason, rheaders = resp.status, resp.reason, resp.getheaders()
                conn.close()
                fault = proxy._draw(self.command, self.path)
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault == "500":
                    msg = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500, "Internal Server Error")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if fault == "flip" and data:
                    i = proxy.rng_index(len(data))
                    data = data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:]
                self.send_response(status, reason)
                for k, v in rheaders:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if proxy.slow and self.command == "GET":
                    for i in range(0, len(data), 1 << 16):
                        self.wfile.write(data[i:i + (1 << 16)])
                        self.wfile.flush()
                        time.sleep(proxy.slow)
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client gone mid-body (kill -9)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def rng_index(self, n):
        with self.lock:
            return self.rng.randrange(n)

    def _draw(self, method, path):
        with self.lock:
            self.requests += 1
            if method not in self.methods or (self.only and not self.only.search(path)):
                return None
            if self.rate and self.rng.random() < self.rate:
                f = self.rng.choice(self.faults)
                self.counts[f] += 1
                return f
        return None

    def injected(self):
        with self.lock:
            return sum(self.counts.values())

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
