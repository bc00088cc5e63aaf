"""`dsk clean`: options come from `dsk.clean`'s params schema; the work is `dsk.clean.run`.

    $ dsk clean --help
"""

from dsk.cli.common import stage_command

command = stage_command("clean")
