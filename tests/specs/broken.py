"""A spec module that fails to import (for the error-message tests)."""

raise ImportError("this spec module is broken on purpose")
