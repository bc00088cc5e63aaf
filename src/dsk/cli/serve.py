"""`dsk serve`: options come from `dsk.serve`'s params schema; the work is `dsk.serve.run`.

    $ dsk serve --help
"""

from dsk.cli.common import stage_command

command = stage_command("serve")
