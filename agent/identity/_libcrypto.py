"""ctypes declarations for the few libcrypto/libssl 3.x functions identity needs.

The libraries are the ones Python's `ssl` module has already mapped, so binding them costs no
memory. Every function gets argtypes and restype; callers check every return with `ok`/`ptr`,
which turn a failure into a CryptoError carrying OpenSSL's own error strings.
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

_P = ctypes.c_void_p
_I = ctypes.c_int
_S = ctypes.c_char_p
_L = ctypes.c_long
_UL = ctypes.c_ulong
_SZ = ctypes.c_size_t
_PP = ctypes.POINTER(ctypes.c_void_p)
_PI = ctypes.POINTER(ctypes.c_int)

BIO_CTRL_INFO = 3  # BIO_get_mem_data
MBSTRING_UTF8 = 0x1000
EXFLAG_CA = 0x10
# XN_FLAG_RFC2253: RFC 2253 escaping, comma separators, most-significant RDN last.
XN_FLAG_RFC2253 = 0x317 | 0x10000 | 0x100000 | 0x1000000


class CryptoError(Exception):
    """An OpenSSL call failed; the message names the operation and OpenSSL's reason."""


class Tm(ctypes.Structure):
    """struct tm as glibc and musl lay it out (only the first six fields are read)."""

    _fields_ = [("tm_sec", _I), ("tm_min", _I), ("tm_hour", _I), ("tm_mday", _I), ("tm_mon", _I),
                ("tm_year", _I), ("tm_wday", _I), ("tm_yday", _I), ("tm_isdst", _I),
                ("tm_gmtoff", _L), ("tm_zone", _S)]


_CRYPTO_FUNCTIONS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "OpenSSL_version_num": (_UL, ()),
    "ERR_get_error": (_UL, ()),
    "ERR_error_string_n": (None, (_UL, _S, _SZ)),
    "ERR_clear_error": (None, ()),
    "OBJ_txt2nid": (_I, (_S,)),
    "BIO_new": (_P, (_P,)),
    "BIO_s_mem": (_P, ()),
    "BIO_new_mem_buf": (_P, (_S, _I)),
    "BIO_free": (_I, (_P,)),
    "BIO_ctrl": (_L, (_P, _I, _L, _P)),
    "EVP_PKEY_CTX_new_from_name": (_P, (_P, _S, _P)),
    "EVP_PKEY_keygen_init": (_I, (_P,)),
    "EVP_PKEY_CTX_set_group_name": (_I, (_P, _S)),
    "EVP_PKEY_generate": (_I, (_P, _PP)),
    "EVP_PKEY_CTX_free": (None, (_P,)),
    "EVP_PKEY_free": (None, (_P,)),
    "EVP_PKEY_is_a": (_I, (_P, _S)),
    "EVP_PKEY_get_group_name": (_I, (_P, _S, _SZ, ctypes.POINTER(_SZ))),
    "EVP_sha256": (_P, ()),
    "i2d_PUBKEY": (_I, (_P, _PP)),
    "PEM_write_bio_PrivateKey": (_I, (_P, _P, _P, _P, _I, _P, _P)),
    "PEM_read_bio_PrivateKey": (_P, (_P, _P, _P, _P)),
    "OPENSSL_sk_new_null": (_P, ()),
    "OPENSSL_sk_push": (_I, (_P, _P)),
    "OPENSSL_sk_num": (_I, (_P,)),
    "OPENSSL_sk_value": (_P, (_P, _I)),
    "OPENSSL_sk_pop_free": (None, (_P, _P)),
    "X509_EXTENSION_free": (None, (_P,)),
    "X509V3_set_ctx": (None, (_P, _P, _P, _P, _P, _I)),
    "X509V3_EXT_nconf_nid": (_P, (_P, _P, _I, _S)),
    "X509V3_get_d2i": (_P, (_P, _I, _PI, _PI)),
    "GENERAL_NAMES_free": (None, (_P,)),
    "GENERAL_NAME_get0_value": (_P, (_P, _PI)),
    "ASN1_STRING_get0_data": (_P, (_P,)),
    "ASN1_STRING_length": (_I, (_P,)),
    "ASN1_TIME_set_string_X509": (_I, (_P, _S)),
    "ASN1_TIME_to_tm": (_I, (_P, ctypes.POINTER(Tm))),
    "ASN1_INTEGER_to_BN": (_P, (_P, _P)),
    "BN_bin2bn": (_P, (_S, _I, _P)),
    "BN_to_ASN1_INTEGER": (_P, (_P, _P)),
    "BN_num_bits": (_I, (_P,)),
    "BN_bn2bin": (_I, (_P, _P)),
    "BN_free": (None, (_P,)),
    "X509_NAME_new": (_P, ()),
    "X509_NAME_free": (None, (_P,)),
    "X509_NAME_add_entry_by_txt": (_I, (_P, _S, _I, _S, _I, _I, _I)),
    "X509_NAME_print_ex": (_I, (_P, _P, _I, _UL)),
    "X509_REQ_new": (_P, ()),
    "X509_REQ_free": (None, (_P,)),
    "X509_REQ_set_version": (_I, (_P, _L)),
    "X509_REQ_set_pubkey": (_I, (_P, _P)),
    "X509_REQ_add_extensions": (_I, (_P, _P)),
    "X509_REQ_get_extensions": (_P, (_P,)),
    "X509_REQ_get0_pubkey": (_P, (_P,)),
    "X509_REQ_sign": (_I, (_P, _P, _P)),
    "X509_REQ_verify": (_I, (_P, _P)),
    "PEM_write_bio_X509_REQ": (_I, (_P, _P)),
    "PEM_read_bio_X509_REQ": (_P, (_P, _P, _P, _P)),
    "X509_new": (_P, ()),
    "X509_free": (None, (_P,)),
    "X509_set_version": (_I, (_P, _L)),
    "X509_get_serialNumber": (_P, (_P,)),
    "X509_get0_serialNumber": (_P, (_P,)),
    "X509_set_issuer_name": (_I, (_P, _P)),
    "X509_set_subject_name": (_I, (_P, _P)),
    "X509_get_subject_name": (_P, (_P,)),
    "X509_get_issuer_name": (_P, (_P,)),
    "X509_set_pubkey": (_I, (_P, _P)),
    "X509_get0_pubkey": (_P, (_P,)),
    "X509_getm_notBefore": (_P, (_P,)),
    "X509_getm_notAfter": (_P, (_P,)),
    "X509_add_ext": (_I, (_P, _P, _I)),
    "X509_get_ext_d2i": (_P, (_P, _I, _PI, _PI)),
    "X509_get_extension_flags": (ctypes.c_uint32, (_P,)),
    "X509_check_private_key": (_I, (_P, _P)),
    "X509_verify": (_I, (_P, _P)),
    "X509_sign": (_I, (_P, _P, _P)),
    "PEM_write_bio_X509": (_I, (_P, _P)),
    "PEM_read_bio_X509": (_P, (_P, _P, _P, _P)),
}

_SSL_FUNCTIONS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "SSL_CTX_set_ciphersuites": (_I, (_P, _S)),
    "SSL_CTX_get_options": (ctypes.c_uint64, (_P,)),
    "SSL_CTX_get_verify_mode": (_I, (_P,)),
}


def _bind(soname: str, table: dict[str, tuple[Any, tuple[Any, ...]]]) -> ctypes.CDLL:
    library = ctypes.CDLL(soname)
    for name, (restype, argtypes) in table.items():
        function = getattr(library, name)
        function.restype = restype
        function.argtypes = argtypes
    return library


crypto = _bind("libcrypto.so.3", _CRYPTO_FUNCTIONS)
libssl = _bind("libssl.so.3", _SSL_FUNCTIONS)

if crypto.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
    raise ImportError(f"libcrypto.so.3 is not the OpenSSL the ssl module uses ({ssl.OPENSSL_VERSION})")

NID_SUBJECT_ALT_NAME: int = crypto.OBJ_txt2nid(b"subjectAltName")
NID_BASIC_CONSTRAINTS: int = crypto.OBJ_txt2nid(b"basicConstraints")
NID_KEY_USAGE: int = crypto.OBJ_txt2nid(b"keyUsage")
NID_EXT_KEY_USAGE: int = crypto.OBJ_txt2nid(b"extendedKeyUsage")
NID_SUBJECT_KEY_ID: int = crypto.OBJ_txt2nid(b"subjectKeyIdentifier")
NID_AUTHORITY_KEY_ID: int = crypto.OBJ_txt2nid(b"authorityKeyIdentifier")
X509_EXTENSION_FREE = ctypes.cast(crypto.X509_EXTENSION_free, ctypes.c_void_p)


def openssl_errors() -> str:
    """Drain this thread's OpenSSL error queue into one string (stale errors would confuse `ssl`)."""
    reasons = []
    buffer = ctypes.create_string_buffer(256)
    while code := crypto.ERR_get_error():
        crypto.ERR_error_string_n(code, buffer, len(buffer))
        reasons.append(buffer.value.decode(errors="replace"))
    return "; ".join(reasons) or "no OpenSSL error recorded"


def fail(what: str) -> CryptoError:
    return CryptoError(f"{what}: {openssl_errors()}")


def ok(result: int, what: str) -> None:
    """Check a 1-on-success (or positive-on-success) return."""
    if result <= 0:
        raise fail(what)


def ptr(result: int | None, what: str) -> int:
    """Check a pointer return (NULL is failure)."""
    if not result:
        raise fail(what)
    return result


def owned(stack: ExitStack, result: int | None, free: Callable[[int], object], what: str) -> int:
    """A non-NULL pointer whose `free` runs when `stack` closes."""
    pointer = ptr(result, what)
    stack.callback(free, pointer)
    return pointer


@contextmanager
def clean_errors() -> Iterator[None]:
    """Leave the error queue empty: some successful reads (PEM at end of data) push errors."""
    crypto.ERR_clear_error()
    try:
        yield
    finally:
        crypto.ERR_clear_error()


def read_bio(stack: ExitStack, data: bytes) -> int:
    """A read-only memory BIO over `data` (the caller keeps `data` alive)."""
    return owned(stack, crypto.BIO_new_mem_buf(data, len(data)), crypto.BIO_free, "BIO_new_mem_buf")


def write_bio(stack: ExitStack) -> int:
    return owned(stack, crypto.BIO_new(crypto.BIO_s_mem()), crypto.BIO_free, "BIO_new")


def bio_bytes(bio: int) -> bytes:
    """Everything written to a memory BIO so far."""
    data = ctypes.c_void_p()
    length = crypto.BIO_ctrl(bio, BIO_CTRL_INFO, 0, ctypes.addressof(data))
    if length == 0:
        return b""
    if length < 0 or not data.value:
        raise fail("BIO_get_mem_data")
    return ctypes.string_at(data.value, length)


def asn1_string(pointer: int) -> bytes:
    length = crypto.ASN1_STRING_length(pointer)
    data = crypto.ASN1_STRING_get0_data(pointer)
    return ctypes.string_at(data, length) if length > 0 and data else b""
