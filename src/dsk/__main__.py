"""`python -m dsk` runs the CLI.

    $ python -m dsk --help
"""

import sys

from dsk.cli.main import main

sys.exit(main())
