"""Record a real openssl s_client <-> s_server exchange through a loopback relay."""
import socket, subprocess, sys, threading, time, os
ver = sys.argv[1]  # tls1 tls1_1 tls1_2 tls1_3
out = sys.argv[2]
sport, rport = 24430, 24431
srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{sport}", "-cert", "c.pem", "-key", "k.pem",
                        "-cipher", "DEFAULT:@SECLEVEL=0", "-naccept", "1", "-quiet"], stdin=subprocess.PIPE,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); ls.bind(("127.0.0.1", rport)); ls.listen(1)
rec = {0: bytearray(), 1: bytearray()}
def pump(a, b, d):
    try:
        while True:
            x = a.recv(65536)
            if not x: break
            rec[d] += x; b.sendall(x)
    except OSError: pass
    try: b.shutdown(socket.SHUT_WR)
    except OSError: pass
def relay():
    c, _ = ls.accept(); s = socket.create_connection(("127.0.0.1", sport))
    t1 = threading.Thread(target=pump, args=(c, s, 0)); t2 = threading.Thread(target=pump, args=(s, c, 1))
    t1.start(); t2.start(); t1.join(); t2.join()
t = threading.Thread(target=relay); t.start()
cli = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{rport}", f"-{ver}", "-servername", "pay.example",
                      "-cipher", "DEFAULT:@SECLEVEL=0", "-alpn", "h2,http/1.1"], input=b"hello\n", capture_output=True, timeout=10)
t.join(5); srv.kill()
open(out + "_client.bin", "wb").write(rec[0]); open(out + "_server.bin", "wb").write(rec[1])
print(ver, len(rec[0]), len(rec[1]), cli.returncode)
