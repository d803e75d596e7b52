"""Security: API keys with scopes, a second factor, rate limits, and the audit trail."""
