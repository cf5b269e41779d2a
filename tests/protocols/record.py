"""Record real client/server conversations for the parser tests (run by hand, once).

    python tests/protocols/record.py [name ...]      # root needed for postgres/mariadb/sshd

Each scenario starts a real Debian server on 127.0.0.1, puts a tiny recording
TCP (or UDP) relay in front of it, runs the real client through the relay, and
writes every ``recv()`` of either side, in the order the relay saw them, to
``data/<name>.json.gz``. The recordings are small and committed, so the unit tests
replay genuine byte streams without needing the servers; the netns integration
tests (owned by the session/proxy work) run the same pairs live.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

DATA = Path(__file__).parent / "data"
#: where ``save`` writes; the live tests point it at a temporary directory
OUT_DIR = DATA
Segment = tuple[int, bytes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not come up")


class TcpRecorder:
    """Relay 127.0.0.1:<port> -> upstream; records (direction, bytes) per recv, per connection."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[list[Segment]] = []
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            segs: list[Segment] = []
            self.conns.append(segs)
            t = threading.Thread(target=self._pump, args=(client, segs), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, client: socket.socket, segs: list[Segment]) -> None:
        server = socket.create_connection(("127.0.0.1", self.upstream))
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, (0, server))
        sel.register(server, selectors.EVENT_READ, (1, client))
        open_dirs = 2
        while open_dirs:
            for key, _ in sel.select(timeout=10):
                direction, other = key.data
                data = key.fileobj.recv(65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_dirs -= 1
                    try:
                        other.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                segs.append((direction, data))
                other.sendall(data)
        client.close()
        server.close()

    def close(self) -> list[list[Segment]]:
        for t in self._threads:
            t.join(timeout=10)
        self.sock.close()
        return self.conns


class UdpRecorder:
    """Datagram relay for DNS over UDP: one client, one server."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.port = self.front.getsockname()[1]
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(("127.0.0.1", upstream))
        self.segs: list[Segment] = []
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.front, selectors.EVENT_READ, 0)
        sel.register(self.back, selectors.EVENT_READ, 1)
        client = None
        while not self._stop:
            for key, _ in sel.select(timeout=0.2):
                if key.data == 0:
                    data, client = self.front.recvfrom(65536)
                    self.segs.append((0, data))
                    self.back.send(data)
                elif client is not None:
                    data = self.back.recv(65536)
                    self.segs.append((1, data))
                    self.front.sendto(data, client)

    def close(self) -> list[list[Segment]]:
        self._stop = True
        time.sleep(0.3)
        return [self.segs]


def save(name: str, app_proto: str, dest_port: int, conns: list[list[Segment]], transport: str = "tcp",
         note: str = "") -> None:
    OUT_DIR.mkdir(exist_ok=True)
    doc = {
        "name": name,
        "app_proto": app_proto,
        "dest_port": dest_port,
        "transport": transport,
        "note": note,
        "connections": [[[d, base64.b64encode(b).decode()] for d, b in segs] for segs in conns if segs],
    }
    with gzip.open(OUT_DIR / f"{name}.json.gz", "wt") as fh:
        fh.write(json.dumps(doc, indent=1) + "\n")
    sizes = [sum(len(b) for _, b in segs) for segs in conns]
    print(f"{name}: {len(conns)} connection(s), bytes {sizes}")


def run(cmd: list[str] | str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 60)
    return subprocess.run(cmd, capture_output=True, shell=isinstance(cmd, str), **kw)


def start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


# -- scenarios -----------------------------------------------------------------------------
def rec_http(tmp: Path) -> None:
    port = free_port()
    root = tmp / "www"
    root.mkdir()
    (root / "index.html").write_text("<h1>palisade</h1>\n" * 20)
    (root / "big.bin").write_bytes(os.urandom(40_000))
    (root / "page.txt").write_text("lorem ipsum dolor sit amet\n" * 2000)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log; worker_processes 1;
events {{ worker_connections 64; }}
http {{ access_log off; client_body_temp_path {tmp}; proxy_temp_path {tmp};
  fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  gzip on; gzip_types text/plain; gzip_min_length 10;
  server {{ listen 127.0.0.1:{port}; root {root};
    location /echo {{ return 201 "created\\n"; }} }} }}
""")
    srv = start(["nginx", "-c", str(conf), "-p", str(tmp)])
    try:
        wait_port(port)
        rec = TcpRecorder(port)
        base = f"http://127.0.0.1:{rec.port}"
        run(["curl", "-sS", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
             f"{base}/index.html", f"{base}/big.bin", "-H", "Accept-Encoding: gzip", f"{base}/page.txt",
             "--next", "-sS", "-o", "/dev/null", "-X", "POST", "--data-binary", "card=4111111111111111",
             f"{base}/echo",
             "--next", "-sS", "-o", "/dev/null", "-I", f"{base}/index.html",
             "--next", "-sS", "-o", "/dev/null", f"{base}/missing"], check=True)
        save("http_nginx_curl", "http", port, rec.close(), note="curl keep-alive: GET x3 (gzip chunked), POST, HEAD, 404")
    finally:
        srv.terminate()
        srv.wait()


def rec_h2c(tmp: Path) -> None:
    port = free_port()
    root = tmp / "h2"
    root.mkdir()
    (root / "index.html").write_text("<h1>h2c</h1>\n" * 10)
    (root / "data.bin").write_bytes(os.urandom(40_000))
    srv = start(["nghttpd", "--no-tls", "-d", str(root), str(port)])
    try:
        wait_port(port)
        rec = TcpRecorder(port)
        base = f"http://127.0.0.1:{rec.port}"
        run(["nghttp", "-n", f"{base}/index.html", f"{base}/data.bin", f"{base}/nope"], check=True)
        save("h2c_nghttpd_nghttp", "http2", port, rec.close(), note="nghttp prior-knowledge h2c, 3 streams")
    finally:
        srv.terminate()
        srv.wait()


def _cert(tmp: Path) -> tuple[Path, Path]:
    key, crt = tmp / "key.pem", tmp / "crt.pem"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
         "-days", "2", "-subj", "/CN=api.card-network.example"], check=True)
    return key, crt


def rec_tls(tmp: Path) -> None:
    key, crt = _cert(tmp)
    for name, server_args, client_args in [
        ("tls13_openssl", [], ["-tls1_3", "-alpn", "h2,http/1.1"]),
        ("tls12_openssl", [], ["-tls1_2", "-alpn", "http/1.1"]),
        ("tls10_refused_openssl", ["-no_tls1", "-no_tls1_1"], ["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"]),
    ]:
        port = free_port()
        srv = start(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-key", str(key), "-cert", str(crt),
                     "-www", "-alpn", "http/1.1", *server_args])
        try:
            wait_port(port)
            rec = TcpRecorder(port)
            run(["openssl", "s_client", "-connect", f"127.0.0.1:{rec.port}", "-servername",
                 "api.card-network.example", *client_args], input=b"GET / HTTP/1.0\r\n\r\n", timeout=20)
            time.sleep(0.3)
            save(name, "tls", 443, rec.close()[:1], note=" ".join(client_args))
        finally:
            srv.terminate()
            srv.wait()


def rec_ssh(tmp: Path) -> None:
    port = free_port()
    hostkey = tmp / "hostkey"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True)
    cfg = tmp / "sshd_config"
    cfg.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\nPidFile {tmp}/sshd.pid\n"
                   "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n")
    os.makedirs("/run/sshd", exist_ok=True)
    srv = start(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)])
    try:
        wait_port(port)
        rec = TcpRecorder(port)
        run(["ssh", "-p", str(rec.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", f"UserKnownHostsFile={tmp}/kh", "nobody@127.0.0.1", "true"])
        save("ssh_openssh", "ssh", 22, rec.close(), note="OpenSSH client vs sshd, auth refused")
    finally:
        srv.terminate()
        srv.wait()


def rec_dns(tmp: Path) -> None:
    port = free_port()
    srv = start(["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", f"--port={port}",
                 "--listen-address=127.0.0.1", "--bind-interfaces", f"--pid-file={tmp}/dnsmasq.pid",
                 "--address=/api.card-network.example/10.1.2.3", "--address=/api.card-network.example/fd00::3",
                 "--cname=www.card-network.example,api.card-network.example",
                 "--mx-host=card-network.example,mail.card-network.example,10",
                 "--txt-record=card-network.example,v=spf1 -all"])
    try:
        wait_port(port)
        rec = TcpRecorder(port)
        for q in (["api.card-network.example", "A"], ["www.card-network.example", "A"],
                  ["card-network.example", "MX"]):
            run(["dig", "+tcp", "+tries=1", "+time=3", "@127.0.0.1", "-p", str(rec.port), *q], check=True)
        save("dns_tcp_dnsmasq_dig", "dns", 53, rec.close(), note="dig +tcp, 3 queries (3 connections)")
        urec = UdpRecorder(port)
        for q in (["api.card-network.example", "AAAA"], ["card-network.example", "TXT"],
                  ["nonexistent.invalid", "A"]):
            run(["dig", "+tries=1", "+time=3", "@127.0.0.1", "-p", str(urec.port), *q], check=True)
        save("dns_udp_dnsmasq_dig", "dns", 53, urec.close(), transport="udp", note="one datagram per segment")
    finally:
        srv.terminate()
        srv.wait()


def rec_redis(tmp: Path) -> None:
    port = free_port()
    srv = start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(tmp)])
    try:
        wait_port(port)
        rec = TcpRecorder(port)
        script = "PING\nSET user:1 alice\nGET user:1\nCONFIG GET maxmemory\nMULTI\nINCR hits\nEXPIRE hits 60\nEXEC\n" \
                 "HSET card:9 pan 4111111111111111 exp 12/29\nDEL user:1 hits\nQUIT\n"
        run(["redis-cli", "-p", str(rec.port)], input=script.encode(), check=True)
        run(f"head -c 30000 /dev/urandom | base64 -w0 | redis-cli -p {rec.port} -x SET blob", check=True)
        save("redis_cli", "redis", 6379, rec.close(), note="redis-cli: ping/set/get/config/multi/hset/del; SET of 40 KB")
    finally:
        srv.terminate()
        srv.wait()


def rec_pgsql(tmp: Path) -> None:
    port = free_port()
    data = tmp / "pg"
    data.mkdir()
    shutil.chown(tmp, "postgres")
    shutil.chown(data, "postgres")
    run(["runuser", "-u", "postgres", "--", "initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True, timeout=120)
    srv = subprocess.Popen(["runuser", "-u", "postgres", "--", "postgres", "-D", str(data), "-p", str(port),
                            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={tmp}",
                            "-c", "ssl=off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 60)
        time.sleep(1)
        rec = TcpRecorder(port)
        conn = f"host=127.0.0.1 port={rec.port} user=postgres dbname=postgres sslmode=disable application_name=rec"
        sql = ("CREATE TABLE cards (id int, pan text);\n"
               "INSERT INTO cards VALUES (1, '4111111111111111');\n"
               "SELECT id FROM cards WHERE id = 1;\n"
               "/* report */ SELECT count(*) FROM cards; UPDATE cards SET id = 2;\n"
               "SELECT * FROM nosuchtable;\n"
               "DROP TABLE cards;\n")
        run(["psql", conn, "-X", "-q"], input=sql.encode(), check=True)
        # -c sends its whole argument as ONE simple Query: two statements, two verbs
        run(["psql", conn, "-X", "-q", "-c", "SELECT 1; DELETE FROM nosuch"])
        rec2 = TcpRecorder(port)
        run(["psql", f"host=127.0.0.1 port={rec2.port} user=postgres dbname=postgres sslmode=prefer", "-X", "-c",
             "SELECT 1"], check=True)
        save("pgsql_psql", "pgsql", 5432, rec.close(), note="psql: DDL, INSERT, SELECT, error; then -c with two statements in one Query (2nd connection)")
        save("pgsql_sslrequest_refused", "pgsql", 5432, rec2.close(), note="sslmode=prefer against ssl=off: SSLRequest answered N")
    finally:
        srv.terminate()
        srv.wait()


def rec_mysql(tmp: Path) -> None:
    port = free_port()
    data = tmp / "my"
    data.mkdir()
    run(["mariadb-install-db", f"--datadir={data}", "--user=root", "--auth-root-authentication-method=normal",
         "--skip-test-db"], check=True, timeout=180)
    srv = start(["mariadbd", f"--datadir={data}", "--user=root", f"--port={port}", "--bind-address=127.0.0.1",
                 f"--socket={tmp}/my.sock", f"--pid-file={tmp}/my.pid", "--skip-grant-tables=0",
                 "--skip-ssl", f"--log-error={tmp}/my.err"])
    try:
        wait_port(port, 60)
        rec = TcpRecorder(port)
        sql = ("CREATE DATABASE shop; USE shop; CREATE TABLE t (id INT, pan VARCHAR(20));"
               "INSERT INTO t VALUES (1, '4111111111111111'); SELECT id FROM t; -- note\n"
               "UPDATE t SET id=2; SELECT * FROM missing; DELETE FROM t;")
        run(["mariadb", "-h", "127.0.0.1", "-P", str(rec.port), "-u", "root", "--skip-ssl", "-f", "mysql", "-e", sql])
        save("mysql_mariadb", "mysql", 3306, rec.close(), note="mariadb client: login db mysql, DDL/DML, an error")
    finally:
        srv.terminate()
        srv.wait()


SCENARIOS: dict[str, Callable[[Path], None]] = {
    "http": rec_http, "h2c": rec_h2c, "tls": rec_tls, "ssh": rec_ssh, "dns": rec_dns,
    "redis": rec_redis, "pgsql": rec_pgsql, "mysql": rec_mysql,
}


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"rec-{name}-") as tmp:
            os.chmod(tmp, 0o755)
            try:
                SCENARIOS[name](Path(tmp))
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                print(f"{name}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
