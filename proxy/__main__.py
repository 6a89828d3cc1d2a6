"""``python -m proxy`` is the ``tlsproxy`` command."""

import sys

from proxy.cli import main

sys.exit(main())
