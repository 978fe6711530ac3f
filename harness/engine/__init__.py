"""The engine: runs one (method, scenario, seed), evaluates and measures it (runner, evaluation,
metrics, costs, energy, checkpoints). Imports the core, never orchestration or the CLI."""
