import sys

from koclip.cli import main

sys.exit(main())
