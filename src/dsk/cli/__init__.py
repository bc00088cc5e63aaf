"""The `dsk` command line: thin Typer commands over the library (see main.py for the table)."""
