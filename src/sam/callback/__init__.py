"""sam-callback: receives Automation Anywhere A360 callbacks and records them in SAM's database."""

from importlib.metadata import version

# The one place the version is written is pyproject.toml; the installed metadata carries it.
__version__ = version("sam-callback")
