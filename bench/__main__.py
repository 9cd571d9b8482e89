"""``python -m bench``: run the benchmark suite and write the report; see bench/suite.py."""

from bench.suite import main

if __name__ == "__main__":
    raise SystemExit(main())
