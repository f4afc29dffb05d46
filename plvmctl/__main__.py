"""`python -m plvmctl` (also what `accelerate launch -m plvmctl ...` runs)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="plvmctl")
