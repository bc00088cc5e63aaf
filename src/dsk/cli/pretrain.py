"""`dsk pretrain`: options come from `dsk.pretrain`'s params schema; the work is `dsk.pretrain.run`.

    $ dsk pretrain --help
"""

from dsk.cli.common import stage_command

command = stage_command("pretrain")
