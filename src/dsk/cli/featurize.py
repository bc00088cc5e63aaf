"""`dsk featurize`: options come from `dsk.featurize`'s params schema; the work is `dsk.featurize.run`.

    $ dsk featurize --help
"""

from dsk.cli.common import stage_command

command = stage_command("featurize")
