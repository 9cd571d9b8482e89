"""The lab side: the link to the relay, forwards, the fast path's data pool, plain hops."""
