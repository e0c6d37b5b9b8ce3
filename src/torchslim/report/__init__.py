"""The run report: report.json (the contract), report.html and its plots."""
