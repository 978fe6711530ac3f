"""``python -m harness.cli`` (and ``torchrun ... -m harness.cli``): the `dmkd` command."""

from harness.cli.main import main

raise SystemExit(main())
