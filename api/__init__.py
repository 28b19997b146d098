"""The Flask API (never imports TensorFlow)."""

import sys

# httpx (used here only to parse webhook URLs exactly as they will be sent) imports its command
# line when click, rich and pygments are installed: ~6 MB per API process for code an API never
# runs. A None entry makes that optional import fail, and httpx then leaves its CLI out.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
