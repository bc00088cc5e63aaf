"""`dsk augment`: options come from `dsk.augment`'s params schema; the work is `dsk.augment.run`.

    $ dsk augment --help
"""

from dsk.cli.common import stage_command

command = stage_command("augment")
