"""`python -m dify_serving.security.audit`: the gateway's audit writer process (`ship.py`)."""

import sys

from dify_serving.security.audit.ship import serve

serve(sys.stdin.buffer, sys.stdout.buffer)
