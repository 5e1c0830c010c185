import sys

from koclip.serve.cli import main

sys.exit(main())
