#!/usr/bin/env python3
"""Record the first bytes a TLS client sends: listen on 127.0.0.1:PORT, accept
one connection, read until one complete ClientHello handshake message has
arrived (walking TLS records, which may fragment it), save exactly the records
that carried it to OUT, then close the connection (the client sees a failed
handshake, which is fine: only its first flight is wanted).

usage: capture.py PORT OUT
"""
import socket
import sys


def complete_len(buf):
    """Bytes of buf holding a whole ClientHello, or None if more are needed."""
    pos, hs, need = 0, b"", None
    while pos + 5 <= len(buf):
        n = int.from_bytes(buf[pos + 3:pos + 5], "big")
        if pos + 5 + n > len(buf):
            return None
        hs += buf[pos + 5:pos + 5 + n]
        pos += 5 + n
        if need is None and len(hs) >= 4:
            need = 4 + int.from_bytes(hs[1:4], "big")
        if need is not None and len(hs) >= need:
            return pos
    return None


def main():
    port, out = int(sys.argv[1]), sys.argv[2]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1)
    srv.settimeout(20)
    conn, _ = srv.accept()
    conn.settimeout(10)
    buf = b""
    while (end := complete_len(buf)) is None:
        chunk = conn.recv(65536)
        if not chunk:
            sys.exit(f"connection closed after {len(buf)} bytes")
        buf += chunk
    with open(out, "wb") as f:
        f.write(buf[:end])
    conn.close()
    print(f"{out}: {end} bytes")


if __name__ == "__main__":
    main()
