import sys

from dsv4.cli.main import main

sys.exit(main())
