"""Orchestration: suites, tuning, coordinated workers and launchers, tracking and storage, the console
table. Imports the engine and the core, never the CLI."""
