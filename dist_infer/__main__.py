import sys

from dist_infer.cli import main

sys.exit(main())
