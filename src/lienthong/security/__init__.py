"""Who may see what: accounts, tokens, SMART scopes, access policy and the audit trail.

A domain service: it builds on storage and implements the interactions layer's
`Guard` protocol, so every interaction is authorised and audited in one place.
"""
