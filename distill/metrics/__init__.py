"""Metrics for the evaluate stage, computed locally (scikit-learn, scipy): nothing is loaded from a hub.

    stats     rates with bootstrap intervals, per-class precision/recall/F1, confusion, calibration,
              the coverage-vs-agreement curve, McNemar's test against a baseline
    cost      teacher usage from the ledger, $ per 1,000 requests, break-even volume
    gate      thresholds and baseline -> pass/fail with reasons, JUnit XML and a Markdown summary
    report    report.md and its plots
"""
