"""`python -m ims_emulator [flags]`: see `ims_emulator.cli`."""

from __future__ import annotations

import sys

from ims_emulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
