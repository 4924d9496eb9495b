"""Generated data: a MER2025-layout video dataset, feature stores with known labels, bench clips."""
