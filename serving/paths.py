"""Where things live: relative paths in the serve config resolve against the project root."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve(path: str | Path) -> Path:
    """An absolute path; relative ones are taken from the project root, not the worker's cwd."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path
