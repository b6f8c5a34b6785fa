"""``python -m fedtune.cli``: the ``fedtune`` command."""

import sys

from fedtune.cli.commands import main

sys.exit(main())
