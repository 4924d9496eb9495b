"""``mer bench <what>``: one module per benchmark, each registering its own subcommand."""
