import sys

from dtr_scale.cli import main

sys.exit(main())
