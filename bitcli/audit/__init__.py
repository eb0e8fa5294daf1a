"""`bit audit DATA`: the data check. `examples` (the splits as one table of examples), `cache` (embeddings kept
by model, preprocessing and file content), `embedding` (the one embedding pass, through bitcli.pipeline and an
engine), `duplicates` (exact duplicates by decoded pixels, near-duplicates by cosine similarity, blockwise),
`labels` (out-of-sample probabilities from a k-fold linear head, then cleanlab's confident learning),
`findings` (the inventory, every finding, audit.json and the CSVs, --fail-on and --write-clean) and `page`
(index.html, on bitcli.pages)."""
