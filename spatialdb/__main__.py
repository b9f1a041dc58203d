import sys

from spatialdb.cli.main import main

sys.exit(main())
