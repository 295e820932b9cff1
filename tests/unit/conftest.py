"""Unit tests: h2, the independent HTTP/2 peer of many of them, with its DATA repr made cheap."""

import tests.h2peer  # noqa: F401 - installs the workaround on import
