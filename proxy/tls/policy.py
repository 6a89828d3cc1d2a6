"""The TLS policy of every server context: Mozilla "intermediate", built from PEM bytes.

All contexts (the listener's and each certificate's) come from here, so a handshake gets
the same protocol versions, ciphers, groups and ALPN whichever certificate SNI selects.

Policy (https://ssl-config.mozilla.org/, intermediate, v5.7):
- TLS 1.2 and 1.3; TLS 1.3 suites are OpenSSL's defaults (AES-GCM and ChaCha20).
- TLS 1.2: ECDHE with AES-GCM or ChaCha20 only. The optional DHE-RSA suites are left out:
  they need DH parameters (Python does not enable OpenSSL's automatic ones) and every client
  that Mozilla intermediate supports speaks ECDHE.
- Groups X25519, P-256, P-384 (OpenSSL 3.0 would also offer X448 and P-521, which scanners
  flag). Python's ``ssl`` only sets a single curve (``set_ecdh_curve``); see
  :func:`_set_groups` for how the list is set, and its fallback.
- The client picks the cipher (no server preference), no compression, no renegotiation,
  session tickets on, ALPN ``h2`` and ``http/1.1`` (``[server] http2 = false``: only
  ``http/1.1``).

The SNI callback (:mod:`proxy.certs.store`) records on each connection's ``SSLObject`` the
server name the client sent; :func:`sni_of` reads it back from the transport's
``ssl_object`` (:mod:`proxy.tls.connection` on either loop, or an asyncio TLS transport).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

log = logging.getLogger("tlsproxy.tls")

TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
GROUPS = "X25519:P-256:P-384"
FALLBACK_CURVE = "prime256v1"  # the one group every Mozilla-intermediate client supports
ALPN = ["h2", "http/1.1"]  # what every context offers; CertStore.set_alpn can narrow it

_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl

# Attributes the SNI callback sets on a connection's SSLObject (it has a __dict__).
SNI_ATTRIBUTE = "tlsproxy_sni"  # the normalized server name; absent when none was sent
FAILURE_ATTRIBUTE = "tlsproxy_failure"  # why the callback ended the handshake, for metrics


class _HasExtraInfo(Protocol):
    def get_extra_info(self, name: str, default: object = None) -> object: ...


def sni_of(transport: _HasExtraInfo) -> str | None:
    """The server name (lower case, no trailing dot) the client sent in its TLS handshake.

    None when it sent none (clients connecting to an IP address) or the transport is not TLS.
    Cheap but not free (a dict lookup in the transport): call it once per connection.
    """
    ssl_object = transport.get_extra_info("ssl_object")
    name = getattr(ssl_object, SNI_ATTRIBUTE, None)
    if not isinstance(name, str) or _is_ip_literal(name):
        return None  # RFC 6066 forbids IP addresses as SNI, but some clients (wrk) send them
    return name


def _is_ip_literal(name: str) -> bool:
    if ":" in name:
        return True
    return name.replace(".", "").isdigit()


def sni_matches_host(sni: str, host: bytes) -> bool:
    """Whether a ``Host`` value (any case, optional port and trailing dot) names ``sni``.

    For the 421 check: a request for another host than the one the TLS session was set up
    for (and whose certificate the client checked) must not be routed on that session.
    """
    name = host.decode("latin-1").lower()
    if name.startswith("["):  # an IPv6 literal; clients never send IP addresses as SNI
        return False
    name = name.partition(":")[0]
    return (name[:-1] if name.endswith(".") else name) == sni


def policy_context() -> ssl.SSLContext:
    """A server context carrying the TLS policy but no certificate (the SNI listener's base)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if not _set_groups(ctx, GROUPS):
        ctx.set_ecdh_curve(FALLBACK_CURVE)
    ctx.set_alpn_protocols(ALPN)
    return ctx


def server_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A policy context serving ``chain_pem`` (leaf first, then intermediates) with ``key_pem``.

    Raises ``ssl.SSLError`` for unparsable PEM or a key that does not match the leaf.
    """
    ctx = policy_context()
    with _pem_path(chain_pem) as cert_path, _pem_path(key_pem) as key_path:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


@contextlib.contextmanager
def _pem_path(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from (``ssl`` loads certificates only from files).

    On Linux an anonymous memory file (``memfd``) through ``/proc/self/fd``: the private key
    never touches a disk. Elsewhere a 0600 file in a fresh 0700 temporary directory, removed
    as soon as it has been read.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("tlsproxy-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="tlsproxy-") as tmp:  # mkdtemp: mode 0700
        path = Path(tmp) / "pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield str(path)


def _set_groups(ctx: ssl.SSLContext, groups: str) -> bool:
    """Set the key-exchange group list of ``ctx``; False when this interpreter cannot.

    Python 3.11's ``ssl`` has no group-list setter (``set_ecdh_curve`` accepts one name). We
    call OpenSSL's ``SSL_CTX_set1_groups_list`` through ctypes on the ``SSL_CTX *`` that is
    the first field after the object header of CPython's ``PySSLContext`` (3.7 to 3.14). The
    pointer is checked first (OpenSSL must report the same options the context does); on any
    doubt we return False and the caller falls back to the single curve P-256, which costs
    X25519-only clients a HelloRetryRequest but stays correct.
    """
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 14):
        return False
    lib = _libssl()
    if lib is None:
        return False
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        log.warning("cannot reach the SSL_CTX; TLS key exchange limited to %s", FALLBACK_CURVE)
        return False
    if lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        lib.ERR_clear_error()  # or Python reports the stale error on its next ssl call
        return False
    return True


@functools.cache
def _libssl() -> ctypes.CDLL | None:
    """The libssl that Python's ``_ssl`` is linked against (not some other copy), or None."""
    path = getattr(sys.modules.get("_ssl"), "__file__", None)
    if path is None:  # statically linked into the interpreter
        return None
    try:
        lib = ctypes.CDLL(path)  # dlsym on it also searches its libssl/libcrypto
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
        lib.ERR_clear_error.restype = None
        lib.ERR_clear_error.argtypes = []
    except (OSError, AttributeError):
        return None
    return lib
