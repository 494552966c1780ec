"""Keeping secrets out of batch scripts: a script is a file others can read and a job log copies it.

Secrets travel in the submitting shell's environment (sbatch exports it to the job by default).
"""

from __future__ import annotations

import re

from recpre.errors import UserError

_SECRET_WORDS = {"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS"}


def is_secret_name(name: str) -> bool:
    """Names like WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD (whole words, so not `tokenizer`)."""
    return any(word in _SECRET_WORDS for word in re.split(r"[^A-Za-z0-9]+", name.upper()))


def check_overrides(overrides: list[str]) -> None:
    """Refuse `key=value` overrides whose key names a secret: they would be written into the script."""
    for item in overrides:
        key = item.split("=", 1)[0]
        if is_secret_name(key.rsplit(".", 1)[-1]):
            raise UserError(
                f"override {key} looks like a secret and would be written into the batch script; "
                "export it as an environment variable in your shell instead"
            )
