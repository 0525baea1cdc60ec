"""Trace estimators, one module per paper: :func:`hutchinson_trace` (Hutchinson 1989) and
:func:`hutchpp_trace` (Meyer et al. 2021), both returning a :class:`TraceEstimate` with a standard
error."""

from landscape.trace._estimate import TraceEstimate
from landscape.trace.hutchinson import hutchinson_trace
from landscape.trace.meyer2021hutchpp import hutchpp_trace

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace"]
