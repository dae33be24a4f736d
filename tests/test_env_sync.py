"""environment.yml and pyproject.toml name the same dependencies."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements):
    return {re.split(r"[<>=\[ ]", r.strip(), maxsplit=1)[0].lower() for r in requirements}


def test_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"]) | _names(project["optional-dependencies"]["test"])
    pins = {r for r in project["dependencies"] if "==" in r}
    env = [line.strip()[2:] for line in (ROOT / "environment.yml").read_text().splitlines()
           if line.strip().startswith("- ") and not line.strip().startswith("- -e")]
    listed = _names(e for e in env if e not in ("pip",) and not e.startswith("python"))
    assert wanted <= listed, f"missing from environment.yml: {sorted(wanted - listed)}"
    assert pins <= set(env), "pinned versions differ between pyproject.toml and environment.yml"
