"""Print the runtime dependencies of pyproject.toml pinned at their lower bounds.

`.ci/run --lowest` installs these over the locked set, so the lower bounds the package
declares are the ones the suite passed on (docs/packaging.md).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

project = tomllib.loads(Path(__file__).parent.parent.joinpath("pyproject.toml").read_text())[
    "project"
]
extras = project["optional-dependencies"]
for req in [*project["dependencies"], *extras["redis"], *extras["uvloop"]]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([^,]+),<.+", req)
    if match is None:
        raise SystemExit(f"a runtime dependency without a >=lower,<upper range: {req!r}")
    print(f"{match[1]}=={match[2]}")
