"""Network service: SCP handlers, ingest, rules, archive, index, retrieve, config, CLI."""
