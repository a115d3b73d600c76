"""SSL contexts for DICOM TLS (PS3.15 Annex B), built from the config.

The server context wraps accepted sockets without a handshake: pynetdicom wraps in its
accept loop, so a client that connects and says nothing would otherwise hold up every other
connection. The handshake then happens on the association's first read, in its own thread.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from dicom_ai.config import ClientTLSConfig, ServerTLSConfig
from dicom_ai.errors import ConfigError

__all__ = ["client_context", "server_context"]

_HANDSHAKE_TIMEOUT_SECONDS = 30.0


class _LazyHandshakeContext(ssl.SSLContext):
    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if kwargs.get("server_side"):
            kwargs["do_handshake_on_connect"] = False
            sock.settimeout(_HANDSHAKE_TIMEOUT_SECONDS)
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(config: ServerTLSConfig) -> ssl.SSLContext:
    context = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
    try:
        context.load_cert_chain(config.certificate, config.private_key)
        if config.ca_certificates is not None:
            context.load_verify_locations(config.ca_certificates)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node.tls: cannot load certificates: {exc}") from exc
    if config.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif config.ca_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(config: ClientTLSConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(config.ca_certificates) if config.ca_certificates else None,
        )
        if config.certificate is not None and config.private_key is not None:
            context.load_cert_chain(config.certificate, config.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"destination tls: cannot load certificates: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = config.check_hostname
    return context
