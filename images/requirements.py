"""Print pyproject.toml's runtime dependencies, one per line, minus the ones an image leaves out.

    python images/requirements.py --exclude torch > requirements.txt

The images install these under `-c requirements.lock`, so they get exactly the locked versions
without a second, hand-kept list that could drift from pyproject.toml.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement ("ray[serve]==2.60.0" -> "ray")."""
    name = re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(pyproject: Path, exclude: set[str]) -> list[str]:
    """`[project].dependencies` without the excluded names."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    excluded = {requirement_name(name) for name in exclude}
    return [dep for dep in dependencies if requirement_name(dep) not in excluded]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--exclude", nargs="*", default=[], help="distribution names to leave out")
    args = parser.parse_args()
    print("\n".join(runtime_requirements(args.pyproject, set(args.exclude))))


if __name__ == "__main__":
    main()
