"""Regenerate the shipped old-to-new commune table (`lienthong.identity.admin_units.SUCCESSORS`).

Run after upgrading vietnamadminunits: `python scripts/legacy_commune_successors.py`. Until then the
table is ignored (it names the package version it was computed with) and the converter runs per commune.
"""

import json
from pathlib import Path

from lienthong.identity import admin_units

target = Path(admin_units.__file__).parent / admin_units.SUCCESSORS
target.write_text(json.dumps(admin_units.successor_table(), ensure_ascii=False, separators=(",", ":")) + "\n",
                  encoding="utf-8")
print(f"wrote {target}")
