"""Write a checkpoint in the Huginn-0125 format: `python evaluate/export_huginn.py --help`, the same command as `recpre-export-huginn` (recpre/cli/export_huginn.py)."""

from recpre.cli.export_huginn import main

if __name__ == "__main__":
    raise SystemExit(main())
