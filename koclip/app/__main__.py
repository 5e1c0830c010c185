import sys

from koclip.app.launcher import main

sys.exit(main())
