"""Storage I/O: local and s3:// files, part stores, Ray Data read settings, redaction of secrets in logs."""
