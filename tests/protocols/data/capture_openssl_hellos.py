"""Re-create the golden openssl_<version>_{client,server}.bin files (run by hand, not by pytest).

A real ``openssl s_client -<version>`` talks to a real ``openssl s_server`` on loopback
through a relay that records each direction's bytes; ``-cipher DEFAULT:@SECLEVEL=0`` lets
OpenSSL 3 still negotiate TLS 1.0 and 1.1.  Usage (needs a cert/key pair in the cwd)::

    openssl req -x509 -newkey rsa:2048 -nodes -keyout k.pem -out c.pem -days 2 -subj /CN=pay.example
    for v in tls1 tls1_1 tls1_2 tls1_3; do python3 capture_openssl_hellos.py $v openssl_$v; done
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

SERVER_PORT, RELAY_PORT = 24430, 24431


def pump(src: socket.socket, dst: socket.socket, rec: bytearray) -> None:
    try:
        while data := src.recv(65536):
            rec += data
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main(version: str, out: str) -> None:
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{SERVER_PORT}", "-cert", "c.pem", "-key", "k.pem",
         "-cipher", "DEFAULT:@SECLEVEL=0", "-naccept", "1", "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", RELAY_PORT))
    listener.listen(1)
    recs = (bytearray(), bytearray())

    def relay() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", SERVER_PORT))
        threads = [threading.Thread(target=pump, args=(client, upstream, recs[0])),
                   threading.Thread(target=pump, args=(upstream, client, recs[1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    t = threading.Thread(target=relay)
    t.start()
    subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{RELAY_PORT}", f"-{version}",
                    "-servername", "pay.example", "-cipher", "DEFAULT:@SECLEVEL=0", "-alpn", "h2,http/1.1"],
                   input=b"hello\n", capture_output=True, timeout=10)
    t.join(5)
    server.kill()
    with open(out + "_client.bin", "wb") as fh:
        fh.write(recs[0])
    with open(out + "_server.bin", "wb") as fh:
        fh.write(recs[1])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
