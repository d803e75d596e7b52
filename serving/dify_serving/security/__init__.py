"""Security: API keys with scopes, a second factor, rate limits, and the audit trail.

`grants` says what a key may do and `keys` stores keys and checks the presented ones;
`totp` is the second factor, `ratelimit` the token buckets, `network` the address rules,
`failures` the budget for refusals before a key is known; `secrets` reads the pepper and
the other secrets, and `db` opens the keys and audit databases (one engine factory, the
default SQLite paths). `audit/` is the tamper-evident trail. The gateway's middleware
(`gateway/security.py`) puts them together per request.
"""
