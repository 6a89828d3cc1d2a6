"""tlsproxy: a TLS-terminating reverse proxy for FastAPI and any HTTP/1.1 app.

Note: the import name ``proxy`` clashes with the unrelated ``proxy-py`` distribution;
do not install both in one environment.
"""

from proxy.config import Config, ConfigError, load_config, parse_config
from proxy.server import Proxy

__all__ = ["Config", "ConfigError", "Proxy", "load_config", "parse_config"]
