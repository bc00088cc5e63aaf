"""`dsk report`: options come from `dsk.report`'s params schema; the work is `dsk.report.run`.

    $ dsk report --help
"""

from dsk.cli.common import stage_command

command = stage_command("report")
