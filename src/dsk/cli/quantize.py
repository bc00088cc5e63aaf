"""`dsk quantize`: options come from `dsk.quantize`'s params schema; the work is `dsk.quantize.run`.

    $ dsk quantize --help
"""

from dsk.cli.common import stage_command

command = stage_command("quantize")
