"""What a person runs and reads: the report, the demo (the CLI is moesift/cli/)."""
