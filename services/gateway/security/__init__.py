"""Who may call: API tokens (auth.py) and TLS on the client-facing ports, with certificate reloading (tls.py)."""
