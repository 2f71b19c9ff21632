"""Side-by-side benchmark of runner-agent and Prefect's Runner (issue 8).

`python -m bench.run --help`, from the repository root, in the agent's venv. See BENCHMARKS.md.
"""
