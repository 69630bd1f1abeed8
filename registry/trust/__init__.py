"""Trust (SPEC §6): who may call, which addresses may be dialled, and over what.

- :mod:`registry.trust.addresses`: the one parser and policy of plugin addresses,
  shared by Register, the health checker and the gateway's dialer.
- :mod:`registry.trust.policy`: the TOML policy file of principals and tokens.
- :mod:`registry.trust.auth`: the server interceptor that turns a bearer token or a
  verified client certificate into a principal, and the per-caller limits.
- :mod:`registry.trust.decoding`: undecodable requests answer INVALID_ARGUMENT, logged
  once per peer host a minute.
- :mod:`registry.trust.limits`: token buckets and counters behind those limits.
- :mod:`registry.trust.tls`: server and client credentials, reloaded when files change.
"""
