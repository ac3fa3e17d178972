"""Connection security of the Kafka clients: TLS and SASL settings, named as Kafka's own clients name them.

Every client of one process (consumer, producer, admin client, restore readers, replay readers) connects with
the same ``KafkaSecurity``. ``PLAINTEXT``, the default, adds no client options.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from streamer.errors import ConfigError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """Security settings of Kafka connections (``security.protocol``, ``sasl.*`` and ``ssl.*`` in Kafka's terms).

    ``ssl_cafile`` names a file of PEM certificates that the brokers' certificates must chain to; without it the
    system's trusted certificates are used. ``ssl_certfile`` and ``ssl_keyfile`` give a client certificate
    for brokers that require one (mutual TLS); the key must not be encrypted.
    """

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(f"Invalid security protocol {self.protocol!r}: expected one of "
                              f"{', '.join(SECURITY_PROTOCOLS)}")
        if self.uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(f"Invalid SASL mechanism {self.sasl_mechanism!r}: expected one of "
                                  f"{', '.join(SASL_MECHANISMS)}")
            if not self.sasl_username or self.sasl_password is None:
                raise ConfigError(f"Security protocol {self.protocol} needs a SASL user name and password: set "
                                  "--sasl-username (STREAMER_SASL_USERNAME) and STREAMER_SASL_PASSWORD")
        elif self.sasl_username or self.sasl_password is not None:
            raise ConfigError(f"A SASL user name or password is set, but security protocol {self.protocol} does not "
                              "use SASL: expected SASL_PLAINTEXT or SASL_SSL (--security-protocol)")
        files = {"--ssl-cafile": self.ssl_cafile, "--ssl-certfile": self.ssl_certfile,
                 "--ssl-keyfile": self.ssl_keyfile}
        set_files = [flag for flag, path in files.items() if path is not None]
        if set_files and not self.uses_ssl:
            raise ConfigError(f"{', '.join(set_files)} set, but security protocol {self.protocol} does not use TLS: "
                              "expected SSL or SASL_SSL (--security-protocol)")
        for flag, path in files.items():
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag} file not found: {path}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError("A client certificate needs both --ssl-certfile and --ssl-keyfile")
        if self.uses_ssl:
            self.ssl_context  # loads the certificates now, so that an unreadable file stops the start

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_ssl(self) -> bool:
        return self.protocol.endswith("SSL")

    @classmethod
    def from_settings(cls, settings: Any) -> KafkaSecurity:
        """Build from ``Settings`` (whose password is a pydantic ``SecretStr``)."""
        password = settings.sasl_password
        return cls(protocol=settings.security_protocol, sasl_mechanism=settings.sasl_mechanism,
                   sasl_username=settings.sasl_username,
                   sasl_password=None if password is None else password.get_secret_value(),
                   ssl_cafile=settings.ssl_cafile, ssl_certfile=settings.ssl_certfile,
                   ssl_keyfile=settings.ssl_keyfile, ssl_check_hostname=settings.ssl_check_hostname)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's consumer, producer, admin client and client."""
        if self.protocol == "PLAINTEXT":
            return {}
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_ssl:
            options["ssl_context"] = self.ssl_context
        if self.uses_sasl:
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                           sasl_plain_password=self.sasl_password)
        return options

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of every connection: broker certificates verified, TLS 1.2 or later."""
        try:
            context = ssl.create_default_context(cafile=None if self.ssl_cafile is None else str(self.ssl_cafile))
            if self.ssl_certfile is not None:
                context.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile))
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(f"Cannot load the TLS certificates ({error}): expected PEM files for --ssl-cafile, "
                              "--ssl-certfile and an unencrypted --ssl-keyfile") from None
        context.check_hostname = self.ssl_check_hostname
        return context

    def describe(self) -> str:
        """Return the protocol, mechanism and user name for logs; never the password."""
        if self.uses_sasl:
            return f"{self.protocol} ({self.sasl_mechanism} as {self.sasl_username})"
        return self.protocol


PLAINTEXT = KafkaSecurity()
