"""Command lines over recpre (evaluation, generation, export, data pipeline, submission).

Each module has `main(argv: list[str] | None = None) -> int` (exit code 2 for bad input, one `error:` line) and is
installed as a `recpre-*` command (see `[project.scripts]` in pyproject.toml); the files under evaluate/,
scripts/ and launchers/ call the same functions. Shared flags live in `recpre.cli.options`.
"""
