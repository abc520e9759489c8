"""``python -m diffq``: the Hydra app."""
from diffq.cli import main

if __name__ == "__main__":
    main()
