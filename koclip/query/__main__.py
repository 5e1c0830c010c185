import sys

from koclip.query.cli import main

sys.exit(main())
