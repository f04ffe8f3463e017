from __future__ import annotations

import os
import sys

# Tests run against the source tree even when the package is not installed in editable mode.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
