import sys

from koclip.cli.main import main

sys.exit(main())
