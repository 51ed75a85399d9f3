"""s3prl upstream for ``mel_hubert`` checkpoints (register it in s3prl as the README shows)."""
