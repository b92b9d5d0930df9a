"""FHIR R4 model layer: official definitions, validation, search-parameter extraction.

The innermost layer: it imports nothing else from lienthong except `lienthong.text`.
"""
