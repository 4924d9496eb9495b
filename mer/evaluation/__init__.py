"""Evaluation: metrics (WAF, accuracy, confusion), scoring predictions against labels, the HTML reports."""
