"""Import a Huginn-0125-format folder as a recpre checkpoint: `python evaluate/import_huginn.py --help`, the same command as `recpre-import-huginn` (recpre/cli/import_huginn.py)."""

from recpre.cli.import_huginn import main

if __name__ == "__main__":
    raise SystemExit(main())
