"""mimo_jax command line, run from a clone: `python launch.py --prompt "Hello"` (the same program as the
`mimo-jax` console script that `pip install` puts on the PATH). The program is mimo_jax/cli.py; `--help`."""
try:
    from mimo_jax.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing
    import os
    import sys

    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)

if __name__ == "__main__":
    main()
