"""embedding-gateway: a caching, coalescing, rate-limiting gateway for embedding APIs."""

__version__ = "0.1.0"
