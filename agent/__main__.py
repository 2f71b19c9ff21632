"""`python -m agent`: the same as the `runner-agent` command."""

from agent.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
