"""Real servers inside a test pod's network namespace, each with a private data dir.

Every helper starts the Debian-packaged server (nginx, nghttpd, openssl s_server,
sshd, dnsmasq, redis-server, postgres, mariadbd) inside ``pod``'s namespace, with
all its state (config, data, sockets, logs, pid files) under ``workdir``, waits
until it listens, and returns a ``Peer``.  ``Peer.stop()`` ends it gracefully
(databases flush and remove their shared memory); the cluster's teardown kills
whatever is left by process group.  Nothing listens outside the test namespaces.

The client command lines that go with each server (curl, nghttp, openssl
s_client, ssh, dig, redis-cli, psql, mysql) are here too, so a test runs the
exact same command with and without the sidecar in the path.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import Pod, wait_until

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), Path("/usr/bin"))


@dataclass
class Peer:
    """One running server process."""

    name: str
    pod: Pod
    proc: subprocess.Popen
    port: int
    workdir: Path
    log: Path | None = None
    stop_signal: int = signal.SIGTERM
    info: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace") if self.log else ""
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, self.stop_signal)
        except (ProcessLookupError, PermissionError):
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)


def _dir(path: Path, owner: str | None = None, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if owner:
        shutil.chown(path, owner, owner)
    os.chmod(path, mode)
    return path


def _spawn(pod: Pod, wd: Path, name: str, cmd: list[str], **kw) -> subprocess.Popen:
    """Start ``cmd`` in the pod with stdout/stderr in ``wd/<name>.out`` (never an unread pipe)."""
    out = open(wd / f"{name}.out", "ab")
    try:
        return pod.popen(cmd, stdout=out, stderr=out, **kw)
    finally:
        out.close()


def _started(peer: Peer, udp: bool = False, timeout: float = 30.0) -> Peer:
    def ok() -> bool:
        if peer.proc.poll() is not None:
            try:
                out = (peer.workdir / f"{peer.name}.out").read_text(errors="replace")
            except OSError:
                out = ""
            raise RuntimeError(f"{peer.name} exited rc={peer.proc.returncode}: {out[-2000:]} "
                               f"{peer.log_text()[-2000:]}")
        return peer.pod.listening(peer.port, udp=udp)

    wait_until(ok, timeout, interval=0.1, what=f"{peer.name} listening on {peer.port} in {peer.pod.ns}")
    return peer


# ------------------------------------------------------------------ HTTP/1.1: nginx
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {wd}/nginx.pid;
error_log {wd}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log {wd}/access.log;
  client_body_temp_path {wd}/body;
  proxy_temp_path {wd}/proxy;
  fastcgi_temp_path {wd}/fcgi;
  uwsgi_temp_path {wd}/uwsgi;
  scgi_temp_path {wd}/scgi;
  default_type text/plain;
  sendfile on;
  keepalive_requests 1000;
  server {{
    listen {port};
    root {wd}/www;
  }}
}}
"""


def nginx(pod: Pod, workdir: Path, port: int, files: dict[str, bytes] | None = None,
          sparse: dict[str, int] | None = None) -> Peer:
    """nginx serving ``files`` (name -> content) and ``sparse`` files (name -> size) from its root."""
    wd = _dir(workdir)
    www = _dir(wd / "www")
    for name, data in (files or {}).items():
        (www / name).write_bytes(data)
    for name, size in (sparse or {}).items():
        with open(www / name, "wb") as fh:
            fh.truncate(size)
    (wd / "nginx.conf").write_text(NGINX_CONF.format(wd=wd, port=port))
    p = _spawn(pod, wd, "nginx", ["nginx", "-c", str(wd / "nginx.conf")])
    peer = Peer("nginx", pod, p, port, wd, wd / "error.log", signal.SIGQUIT)
    peer.info["access_log"] = wd / "access.log"
    return _started(peer)


def curl(*args: str) -> list[str]:
    return ["curl", "-sS", "--max-time", "20", *args]


# ------------------------------------------------------------------ HTTP/2 cleartext: nghttpd
def nghttpd(pod: Pod, workdir: Path, port: int, files: dict[str, bytes]) -> Peer:
    """nghttpd without TLS: clients must speak h2c with prior knowledge."""
    wd = _dir(workdir)
    www = _dir(wd / "www")
    for name, data in files.items():
        (www / name).write_bytes(data)
    p = _spawn(pod, wd, "nghttpd", ["nghttpd", "--no-tls", "-d", str(www), str(port)])
    return _started(Peer("nghttpd", pod, p, port, wd))


def nghttp(*urls: str) -> list[str]:
    """nghttp sends http:// URIs as h2c with prior knowledge (no Upgrade) on one connection."""
    return ["nghttp", "--timeout=20", *urls]


# ------------------------------------------------------------------ TLS: openssl s_server
def self_signed(workdir: Path, cn: str) -> tuple[Path, Path]:
    wd = _dir(workdir)
    cert, key = wd / "cert.pem", wd / "key.pem"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "2", "-subj", f"/CN={cn}", "-addext", f"subjectAltName=DNS:{cn}",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def openssl_server(pod: Pod, workdir: Path, port: int, version: str, cn: str,
                   files: dict[str, bytes]) -> Peer:
    """``openssl s_server -WWW`` restricted to one TLS version ("1.2" or "1.3"), serving ``files``."""
    wd = _dir(workdir)
    cert, key = self_signed(wd, cn)
    for name, data in files.items():
        (wd / name).write_bytes(data)
    flag = {"1.2": "-tls1_2", "1.3": "-tls1_3"}[version]
    name = f"s_server-tls{version}"
    p = _spawn(pod, wd, name, ["openssl", "s_server", "-accept", str(port), "-cert", str(cert), "-key",
                               str(key), flag, "-WWW", "-quiet"], cwd=str(wd), stdin=subprocess.DEVNULL)
    peer = Peer(name, pod, p, port, wd)
    peer.info.update(cert=cert, cn=cn)
    return _started(peer)


def s_client(host: str, port: int, sni: str) -> list[str]:
    return ["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", sni, "-brief"]


# ------------------------------------------------------------------ SSH: sshd
def sshd(pod: Pod, workdir: Path, port: int) -> Peer:
    """sshd with a private host key; root may log in with the generated client key only."""
    wd = _dir(workdir)
    if not (wd / "hostkey").exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wd / "hostkey")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wd / "clientkey")], check=True)
        shutil.copy(wd / "clientkey.pub", wd / "authorized_keys")
    (wd / "sshd_config").write_text(
        f"Port {port}\nHostKey {wd}/hostkey\nPidFile {wd}/sshd.pid\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nAuthorizedKeysFile {wd}/authorized_keys\nUseDNS no\nPrintMotd no\n"
        "LogLevel VERBOSE\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    p = _spawn(pod, wd, "sshd", ["/usr/sbin/sshd", "-D", "-f", str(wd / "sshd_config"), "-E",
                                 str(wd / "sshd.log")])
    peer = Peer("sshd", pod, p, port, wd, wd / "sshd.log")
    peer.info["key"] = wd / "clientkey"
    return _started(peer)


def ssh(host: str, port: int, key: Path, *command: str) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10", "-p", str(port), f"root@{host}", *command]


# ------------------------------------------------------------------ DNS: dnsmasq
def dnsmasq(pod: Pod, workdir: Path, records: dict[str, list[str]], ttl: int = 300) -> Peer:
    """Authoritative-only dnsmasq on the pod's address, port 53 (UDP and TCP), logging queries."""
    wd = _dir(workdir)
    args = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--no-poll", "--bind-interfaces", f"--listen-address={pod.ip}", "--port=53", "--user=root",
            "--group=root", "--pid-file=", f"--log-facility={wd}/dnsmasq.log", "--log-queries",
            f"--local-ttl={ttl}"]
    for name, addrs in records.items():
        for a in addrs:
            args.append(f"--host-record={name},{a}")
    p = _spawn(pod, wd, "dnsmasq", args)
    peer = Peer("dnsmasq", pod, p, 53, wd, wd / "dnsmasq.log")
    _started(peer, udp=True)
    return _started(peer)


def dig(server: str, name: str, *opts: str) -> list[str]:
    return ["dig", f"@{server}", name, "A", "+noall", "+answer", "+time=2", "+tries=1", *opts]


# ------------------------------------------------------------------ Redis
def redis(pod: Pod, workdir: Path, port: int) -> Peer:
    wd = _dir(workdir)
    p = _spawn(pod, wd, "redis", ["redis-server", "--bind", pod.ip, "--port", str(port), "--save", "",
                                  "--appendonly", "no", "--dir", str(wd), "--protected-mode", "no",
                                  "--daemonize", "no", "--logfile", str(wd / "redis.log")])
    return _started(Peer("redis", pod, p, port, wd, wd / "redis.log"))


def redis_cli(host: str, port: int) -> list[str]:
    """Commands come on stdin, one per line, all on one connection."""
    return ["redis-cli", "-h", host, "-p", str(port)]


# ------------------------------------------------------------------ PostgreSQL
def postgres(pod: Pod, workdir: Path, port: int, user: str, password: str, database: str) -> Peer:
    """initdb as the postgres user into workdir, listen on the pod IP (scram-sha-256 over TCP),
    then create ``user`` (password auth) owning ``database`` over the private unix socket."""
    wd = _dir(workdir)
    data = _dir(wd / "data", "postgres", 0o700)
    sock = _dir(wd / "sock", "postgres", 0o755)
    pw = wd / "pwfile"
    pw.write_text("unused-superuser-password\n")
    shutil.chown(pw, "postgres", "postgres")
    asuser = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    if not (data / "PG_VERSION").exists():
        subprocess.run([*asuser, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pw),
                        "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8",
                        "--locale=C"], check=True, capture_output=True, cwd=str(wd))
        with open(data / "pg_hba.conf", "a") as fh:
            fh.write("host all all 0.0.0.0/0 scram-sha-256\n")
    log = wd / "postgres.out"
    p = _spawn(pod, wd, "postgres", [*asuser, str(PG_BIN / "postgres"), "-D", str(data), "-c", f"listen_addresses={pod.ip}",
                   "-c", f"port={port}", "-c", f"unix_socket_directories={sock}", "-c", "fsync=off",
                   "-c", "synchronous_commit=off", "-c", "shared_buffers=16MB", "-c", "max_connections=20"],
               cwd=str(wd))
    peer = Peer("postgres", pod, p, port, wd, log, signal.SIGINT)  # SIGINT = fast shutdown
    _started(peer)
    local = [str(PG_BIN / "psql"), "-X", "-q", "-h", str(sock), "-p", str(port), "-U", "postgres",
             "-v", "ON_ERROR_STOP=1", "-d", "postgres"]
    pod.run([*local, "-c", f"CREATE ROLE {user} LOGIN PASSWORD '{password}'",
             "-c", f"CREATE DATABASE {database} OWNER {user}"])
    peer.info.update(user=user, password=password, database=database, socket=sock)
    return peer


def psql(host: str, port: int, user: str, database: str) -> list[str]:
    """Statements on stdin; the password comes from PGPASSWORD."""
    return ["psql", f"host={host} port={port} user={user} dbname={database} sslmode=disable",
            "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]


# ------------------------------------------------------------------ MariaDB
def mariadb(pod: Pod, workdir: Path, port: int, user: str, password: str, database: str) -> Peer:
    """mariadb-install-db into workdir, mariadbd on the pod IP without TLS, then ``user``@'%' with
    a password and all privileges on ``database`` (set up over the private unix socket)."""
    wd = _dir(workdir)
    data = _dir(wd / "data", "mysql", 0o750)
    run = _dir(wd / "run", "mysql", 0o755)
    sock = run / "mysqld.sock"
    if not (data / "mysql").exists():
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=mysql",
                        "--auth-root-authentication-method=socket", "--skip-test-db", "--skip-name-resolve"],
                       check=True, capture_output=True, cwd=str(wd))
    log = wd / "mariadb.err"
    p = _spawn(pod, wd, "mariadbd", ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=mysql", f"--bind-address={pod.ip}",
                   f"--port={port}", f"--socket={sock}", f"--pid-file={run}/mariadbd.pid", "--skip-name-resolve",
                   "--skip-log-bin", "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M",
                   "--skip-ssl", "--innodb-flush-log-at-trx-commit=0", f"--log-error={log}"],
               cwd=str(wd))
    peer = Peer("mariadbd", pod, p, port, wd, log)
    _started(peer, timeout=60)
    pod.run(["mariadb", "--no-defaults", "-S", str(sock), "-u", "root", "-e",
             f"CREATE DATABASE {database}; CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'; "
             f"GRANT ALL ON {database}.* TO '{user}'@'%';"])
    version = pod.run(["mariadb", "--no-defaults", "-S", str(sock), "-u", "root", "-N", "-B", "-e",
                       "SELECT VERSION()"]).stdout.strip()
    peer.info.update(user=user, password=password, database=database, socket=sock, version=version)
    return peer


def mysql(host: str, port: int, user: str, password: str, database: str, statements: str) -> list[str]:
    return ["mysql", "--no-defaults", "-h", host, "-P", str(port), "-u", user, f"-p{password}", "--skip-ssl",
            "-D", database, "--batch", "--skip-column-names", "-e", statements]


def stop_all(peers: list[Peer]) -> None:
    for p in reversed(peers):
        try:
            p.stop()
        except Exception:  # noqa: BLE001 - teardown continues; the cluster kills what is left
            pass


def wait_file_contains(path: Path, text: str, timeout: float = 10.0) -> None:
    wait_until(lambda: path.exists() and text in path.read_text(errors="replace"), timeout,
               what=f"{text!r} in {path}")
