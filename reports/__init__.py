"""Results -> LEADERBOARD.md and a self-contained report.html (issue #7).

Entry points: :func:`reports.build.make_report` (records in memory) and
:func:`reports.build.report_from_results` (records from a results folder or an MLflow store).
Reports read only results; they never import the runner or a method.
"""
