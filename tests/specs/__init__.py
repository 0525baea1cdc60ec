"""Example spec modules for ``landscape analyze`` (used by the tests; importable as ``tests.specs.*``)."""
