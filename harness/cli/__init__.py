"""Every argument parser of the harness: the `dmkd` command (:mod:`harness.cli.main`, also the torchrun
entry point: ``torchrun ... -m harness.cli run ...``) and the docs generator (:mod:`harness.cli.defaults`)."""
