"""One module per pipeline stage, each a thin entry: config -> components -> engine."""
