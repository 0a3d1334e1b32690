"""python -m model {train,eval,caption,bench} ... — see model/cli.py."""

from model.cli import main

raise SystemExit(main())
