"""`dsk eval`: options come from `dsk.evaluate`'s params schema; the work is `dsk.evaluate.run`.

    $ dsk eval --help
"""

from dsk.cli.common import stage_command

command = stage_command("eval")
