"""Warm engine starts (docs/warm-engine.md):

- `template`: the program the flow's python runs: imports Prefect once, forks a run per request;
- `pool`: the templates of this agent, started on demand, replaced when they die or go stale;
- `launcher`: `WarmLauncher`, the configured launcher with warm starts, and the run's handle;
- `memory`: what the templates cost, for `runner-agent status`.
"""
