"""`dsk export`: options come from `dsk.export`'s params schema; the work is `dsk.export.run`.

    $ dsk export --help
"""

from dsk.cli.common import stage_command

command = stage_command("export")
