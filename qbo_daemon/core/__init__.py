"""What every layer shares: models, errors, the clock, metrics. Imports nothing of ours."""
