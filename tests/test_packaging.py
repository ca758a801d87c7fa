"""pyproject.toml lists every package, so a wheel (not only an editable install) holds all of letkit."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "letkit").rglob("__init__.py")}
    found |= {name for name, directory in tool["package-dir"].items() if (ROOT / directory / "__init__.py").is_file()}
    assert found == listed, f"packages missing from pyproject.toml: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
    for pattern in tool.get("package-data", {}).get("letkit", []):
        assert list((ROOT / "letkit").glob(pattern)), pattern
