"""Session storage: the SessionStore interface and records (store.py), the embedded in-memory store and the Redis
store (Lua compare-and-set, Sentinel, TLS)."""
