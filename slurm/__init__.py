"""SLURM launching through submitit (see DESIGN §6)."""
