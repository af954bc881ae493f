"""What a run owns on disk and records: its folder and lock, checkpoints, the checks before
it starts (preflight), MLflow tracking, the rank-0 recorder, curves and figures."""
