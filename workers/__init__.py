"""Workers turn image references into captions: fetch, decode, batch, OFA, persist."""
