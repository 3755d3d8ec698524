"""schemathesis against a running `hype vmm` over its Unix socket (see scripts/api-schemathesis).

schemathesis speaks TCP, so a small forwarder here relays each TCP connection to the socket.
"""

import os
import socket
import socketserver
import subprocess
import threading
import time

import requests
import schemathesis
from hypothesis import HealthCheck, settings

BIN = os.environ["HYPE_BIN"]
GUEST = os.environ["HYPE_GUEST"]
WORK = os.environ["HYPE_WORK"]
SOCK = os.path.join(WORK, "api.sock")
MAX = int(os.environ.get("HYPE_MAX_EXAMPLES", "100"))


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class Forward(socketserver.BaseRequestHandler):
    def handle(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
            up.connect(SOCK)
            t = threading.Thread(target=pump, args=(up, self.request), daemon=True)
            t.start()
            pump(self.request, up)
            t.join(30)


socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer.allow_reuse_address = True
proxy = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Forward)
threading.Thread(target=proxy.serve_forever, daemon=True).start()
BASE = f"http://127.0.0.1:{proxy.server_address[1]}"

schema = schemathesis.openapi.from_path(os.environ["HYPE_API_DOC"])
session = requests.Session()


class Vmm:
    """One `hype-vmm` at a time; started again when a case ended it."""

    def __init__(self):
        self.proc = None
        self.starts = 0

    def ensure(self):
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            assert self.proc.returncode == 0, f"hype vmm exited {self.proc.returncode}"
        log = open(os.path.join(WORK, f"vmm{self.starts}.log"), "w")
        self.proc = subprocess.Popen(
            [BIN, "--kernel", GUEST, "--memory", "64M", "--serial", "none",
             "--api-socket", SOCK],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.starts += 1
        deadline = time.time() + 20
        while not os.path.exists(SOCK):
            assert time.time() < deadline, "API socket never appeared"
            assert self.proc.poll() is None, "hype vmm died at start"
            time.sleep(0.01)

    def finish(self):
        """After a stop or shutdown: make sure this VMM ends (stop it) and exits 0."""
        try:
            session.post(BASE + "/vm/stop", timeout=10, headers={"Connection": "close"})
        except Exception:
            pass
        assert self.proc.wait(timeout=20) == 0, "hype vmm did not exit 0"


vmm = Vmm()


@schema.parametrize()
@settings(max_examples=MAX, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api(case):
    vmm.ensure()
    # One connection per case: a case may end the VMM behind a kept-alive connection.
    response = case.call(base_url=BASE, session=session, timeout=30,
                         headers={"Connection": "close"})
    case.validate_response(response)
    assert response.status_code < 500, response.text
    if case.path in ("/vm/stop", "/vm/shutdown") and response.status_code == 202:
        vmm.finish()
    assert vmm.proc.poll() in (None, 0)
