import sys

from fastgpt.cli import main

sys.exit(main())
