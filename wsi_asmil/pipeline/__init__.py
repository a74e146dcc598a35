"""The Snakemake glue: config sections to stage options, config overrides, run provenance,
Snakemake fixes and the console that summarises a run."""
