"""Real HTTP/2 conversations for bench/hotpath.py, captured on loopback (2026-12-06).

`H2LOAD_NGINX_*`: `h2load -c1 -m1` (nghttp2 1.52) against nginx 1.22 h2c serving the 1 KiB
file of the side-by-side lab (`listen ... http2; sendfile off`), read by a relay that records
each read: the client's preface, SETTINGS, WINDOW_UPDATE and first HEADERS; nginx's SETTINGS,
WINDOW_UPDATE, ACK, HEADERS and DATA; then one read per request each way (h2load's 12-byte
HEADERS, every field indexed; nginx's 108-byte HEADERS, literals with incremental indexing
that nginx never refers to again, and the DATA in one read). `GRPC_UNARY_*`: the unary echo of
bench/h2grpc.py (grpcio 1.85 client and aio server, 1 KiB message) the same way; the steady
request is HEADERS + WINDOW_UPDATE + DATA + WINDOW_UPDATE, the answer HEADERS + DATA +
trailers + WINDOW_UPDATE, as they came in one read each.

The bytes are the captured ones except DATA payloads (an observer never reads them), stored
as their frame headers only and filled with zeros. `conversation` repeats the steady request
with the stream ids of each next request.
"""

from __future__ import annotations

from typing import Final

_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _chunk(text: str) -> bytes:
    """A captured read, its DATA payloads (stored as nothing) filled with zeros."""
    stored, out = bytes.fromhex(text), bytearray()
    pos = 0
    if stored.startswith(_PREFACE):
        out += _PREFACE
        pos = len(_PREFACE)
    while pos < len(stored):
        header = stored[pos : pos + 9]
        length = int.from_bytes(header[:3], "big")
        out += header
        pos += 9
        if header[3] == 0:  # DATA
            out += bytes(length)
        else:
            out += stored[pos : pos + length]
            pos += length
    return bytes(out)


def _restream(chunk: bytes, old: int, new: int) -> bytes:
    """The same frames, those of stream `old` moved to stream `new`."""
    out, pos = bytearray(chunk), 0
    while pos < len(out):
        length = int.from_bytes(out[pos : pos + 3], "big")
        if int.from_bytes(out[pos + 5 : pos + 9], "big") == old:
            out[pos + 5 : pos + 9] = new.to_bytes(4, "big")
        pos += 9 + length
    return bytes(out)


H2LOAD_NGINX_SETUP: Final = (
    (True, _chunk(
        "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a00000c04000000000000020000000000043f"
        "ffffff0000040800000000003fff00000000280105000000010486603d578cd57f86418b089d5c0b8170"
        "dc0bc07c1f827a8f9c541c722954d3a5358980aed89707"
    )),
    (False, _chunk(
        "000012040000000000000300000080000400010000000500ffffff0000040800000000007fff00000000"
        "0004010000000000006c010400000001887689aa6355e580ae212e1f6196dd6d5f4a01c52f948a080271"
        "40b5700e5c69a53168df5f87497ca58ae819aa5c04313032346c96dd6d5f4a01c52f948a08027140b570"
        "0e5c65f53168df00832a47378bfe5c8c2db9196559a003f9008919085ad2b583aa62a3848fd24a8f"
    )),
    (False, _chunk(
        "000400000100000001"
    )),
    (True, _chunk(
        "00000004010000000000000c0105000000030486603d578cd57f86bf82be"
    )),
    (False, _chunk(
        "00006c010400000003887689aa6355e580ae212e1f6196dd6d5f4a01c52f948a08027140b5700e5c69a5"
        "3168df5f87497ca58ae819aa5c04313032346c96dd6d5f4a01c52f948a08027140b5700e5c65f53168df"
        "00832a47378bfe5c8c2db9196559a003f9008919085ad2b583aa62a3848fd24a8f000400000100000003"
    )),
)
H2LOAD_NGINX_REQUEST: Final = (
    (True, _chunk(
        "00000c0105000000050486603d578cd57f86bf82be"
    )),
    (False, _chunk(
        "00006c010400000005887689aa6355e580ae212e1f6196dd6d5f4a01c52f948a08027140b5700e5c69a5"
        "3168df5f87497ca58ae819aa5c04313032346c96dd6d5f4a01c52f948a08027140b5700e5c65f53168df"
        "00832a47378bfe5c8c2db9196559a003f9008919085ad2b583aa62a3848fd24a8f000400000100000005"
    )),
)
GRPC_UNARY_SETUP: Final = (
    (True, _chunk(
        "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a000024040000000000000200000000000300"
        "000000000400400000000500400000000600004000fe0300000001000004080000000000003f0001"
    )),
    (False, _chunk(
        "000018040000000000000400400000000500400000000600004000fe0300000001000004080000000000"
        "003f0001"
    )),
    (False, _chunk(
        "000000040100000000"
    )),
    (True, _chunk(
        "0000000401000000000000dc01040000000140053a70617468172f70696e696f6e2e62656e63682e4563"
        "686f2f4563686f400a3a617574686f726974790f3132372e302e302e313a31383039318386400c636f6e"
        "74656e742d74797065106170706c69636174696f6e2f677270634002746508747261696c657273401467"
        "7270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c20677a69"
        "70400a757365722d6167656e7438677270632d707974686f6e2d6173796e63696f2f312e38352e342067"
        "7270632d632f35382e302e3020286c696e75783b20636874747032290000040800000000010000000500"
        "040500010000000100000408000000000000000005"
    )),
    (False, _chunk(
        "00000806000000000049049a3bce091c92"
    )),
    (True, _chunk(
        "00000806010000000049049a3bce091c92"
    )),
    (False, _chunk(
        "00004e01040000000188400c636f6e74656e742d74797065106170706c69636174696f6e2f6772706340"
        "14677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c2067"
        "7a697000040500000000000100001e010500000001400b677270632d7374617475730130000c67727063"
        "2d6d6573736167650000000408000000000000000405"
    )),
)
GRPC_UNARY_REQUEST: Final = (
    (True, _chunk(
        "000008010400000007c3c28386c1c0bfbe00000408000000000700000005000405000100000007000004"
        "08000000000000000405"
    )),
    (False, _chunk(
        "00000301040000000788c0bf000405000000000007000010010500000007be000c677270632d6d657373"
        "6167650000000408000000000000000405"
    )),
)

# name: (set-up reads, one steady request's reads, its stream id, requests in the set-up)
CONVERSATIONS: Final = {
    "h2load-nginx": (H2LOAD_NGINX_SETUP, H2LOAD_NGINX_REQUEST, 5, 2),
    "grpc-unary": (GRPC_UNARY_SETUP, GRPC_UNARY_REQUEST, 7, 1),
}


def conversation(name: str, requests: int) -> tuple[list[tuple[bool, bytes]], list[tuple[bool, bytes]]]:
    """(set-up reads, then the reads of `requests` more requests): (from_client, bytes) each."""
    setup, request, stream, _ = CONVERSATIONS[name]
    reads = [(from_client, _restream(data, stream, stream + 2 * n))
             for n in range(requests) for from_client, data in request]
    return list(setup), reads
