"""lienthong: FHIR R4 repository, patient index and exchange for Vietnamese health facilities."""

__version__ = "0.1.0"
