"""``python -m v4lab.chips ...``: see :mod:`v4lab.chips.cli`."""

from v4lab.chips.cli import main

raise SystemExit(main())
