"""FHIR RESTful interactions as plain Python, independent of HTTP.

The HTTP API, the CLI loader and the domain services (identity, exchange, EMR)
all go through this layer, so every write is validated, indexed, versioned and
(once access control lands) authorised and audited in exactly one place.
"""
