"""``python -m harness.cli`` (and ``torchrun ... -m harness.cli``): the `dmkd` command."""

from harness.cli.dmkd import main

raise SystemExit(main())
