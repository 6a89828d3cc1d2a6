"""tlsproxy: a TLS-terminating reverse proxy for FastAPI and any HTTP/1.1 app.

The names below are the library API (docs/library.md); everything else in the package may
change between versions. A whole proxy's life::

    from proxy import Proxy, load_config

    async with Proxy(load_config("proxy.toml")) as proxy:
        await proxy.serve_forever()  # until another task awaits proxy.stop()

or with the configuration built in code::

    from proxy import Config, Proxy, Site, TLSConfig, Upstream

    config = Config(
        sites=(Site(hosts=("app.localhost",), upstreams=(Upstream("127.0.0.1", 8000),)),),
        tls=TLSConfig(issuer="internal"),
    )

``await proxy.reload(new_config)`` applies new sites, upstreams and certificates without
dropping connections; ``Proxy(config, cert_store=..., challenges=...)`` brings your own
certificate store (any code can ``install`` certificates into it) and ACME challenge store.

Note: the import name ``proxy`` clashes with the unrelated ``proxy-py`` distribution;
do not install both in one environment.
"""

from acme_client.interfaces import CertificateSink, ChallengeStore, MemoryChallengeStore
from proxy.certs.sources import CertificateError
from proxy.certs.store import CertStore
from proxy.config import (
    ACMEConfig,
    Address,
    Config,
    ConfigError,
    Route,
    ServerConfig,
    Site,
    TLSConfig,
    Upstream,
    load_config,
    parse_config,
)
from proxy.envconfig import load_config_with_env
from proxy.server import Listener, Proxy

__all__ = [
    "ACMEConfig",
    "Address",
    "CertStore",
    "CertificateError",
    "CertificateSink",
    "ChallengeStore",
    "Config",
    "ConfigError",
    "Listener",
    "MemoryChallengeStore",
    "Proxy",
    "Route",
    "ServerConfig",
    "Site",
    "TLSConfig",
    "Upstream",
    "load_config",
    "load_config_with_env",
    "parse_config",
]
