"""sam-callback: receives Automation Anywhere A360 callbacks and records them in SAM's database."""

__version__ = "1.0.0"
