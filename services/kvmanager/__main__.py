"""`python -m services.kvmanager --port P --redis URL --ttl S`: the same as `apar kvmanager`."""
import sys

from services.kvmanager.cli import main

sys.exit(main())
