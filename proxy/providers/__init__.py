"""Where sites come from besides the configuration file: container labels (Docker API)."""
