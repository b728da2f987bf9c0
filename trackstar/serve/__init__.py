"""`trackstar serve` and `trackstar view`: the report site and a live trace API over a built pipeline."""
