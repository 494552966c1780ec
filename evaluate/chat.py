"""Chat with a checkpoint in the terminal: `python evaluate/chat.py --help`, the same command as `recpre-chat`
(recpre/cli/chat.py)."""

from recpre.cli.chat import main

if __name__ == "__main__":
    raise SystemExit(main())
