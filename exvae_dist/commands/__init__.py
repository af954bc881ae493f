"""The command lines (cli.py is their shared front); `python -m exvae_dist.<command>` runs
each through the small entry-point file of the same name at the top of the package."""
