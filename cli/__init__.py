"""The typer CLI, installed as ``raeflow.cli`` (the ``cli/`` folder maps there in pyproject.toml)."""
